# One image: `permiso admin`, `permiso sidecar`, `permiso dev`, plus the demo services
# (mt5-demo, account-demo) used by docker-compose.yml.
FROM rust:1.95-bookworm AS build
# pingora-core -> flate2 (zlib-ng) needs cmake to build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The manifest names the test and bench targets, so their files must be present to build.
COPY Cargo.toml Cargo.lock schema.sql config.toml ./
COPY crates crates
COPY migrations migrations
COPY src src
COPY tests tests
COPY benches benches
COPY examples examples
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
# A fixed uid, so files written for it on shared volumes (docker-compose secrets) match.
RUN useradd --system --uid 10001 --home /var/lib/permiso --create-home permiso
COPY --from=build /src/target/release/permiso /src/target/release/mt5-demo /src/target/release/account-demo /usr/local/bin/
COPY config.toml /etc/permiso/config.toml
USER permiso
WORKDIR /var/lib/permiso
EXPOSE 8000 9001
ENTRYPOINT ["permiso"]
# The admin plane by default; run a sidecar with: sidecar --config /etc/permiso/config.toml
# (mount a config whose [sidecar] listen is 0.0.0.0:9001 and whose upstream/admin_url name
# the right hosts, and set PERMISO_SYNC_KEY).
CMD ["admin", "--config", "/etc/permiso/config.toml", "--listen", "0.0.0.0:8000", "--database", "/var/lib/permiso/permiso.db"]
