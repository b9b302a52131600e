#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: the sidecar, the passthrough on the
# same HTTP/1 path without auth, pingora-proxy as a passthrough (the sidecar's path before
# issue 15) and nginx. Repeatable where wall-clock load tests on this shared machine are not.
#   cargo build --release --bins && bash benches/callgrind.sh
# Needs valgrind and python3. Each proxy runs under callgrind twice (N1 and N2 keep-alive
# requests after start-up); (I(N2) - I(N1)) / (N2 - N1) removes start-up and sync costs.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
N1=${N1:-2000}
N2=${N2:-6000}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"' EXIT
export PERMISO_ADMIN_API_KEY=callgrind-admin-key-0123456789 RUST_LOG=warn

. benches/support/env.sh
UP=$(port)
$BIN/account-demo --listen 127.0.0.1:$UP >"$work/up.log" 2>&1 &
start_admin

# Sends N requests on one keep-alive connection; every answer must be 200.
drive() {
  python3 - "$1" "$2" "$KEY" <<'PY'
import http.client, sys
port, n, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("GET", "/api/v1/accounts/1", headers={"Authorization": "Bearer " + key})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
}

# Runs one proxy under callgrind, sends N requests, stops it, prints total instructions.
measure() { # name n command...
  local name=$1 n=$2; shift 2
  local out="$work/cg.$name.$n"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >"$work/$name.$n.log" 2>&1 &
  local pid=$!
  wait_http "http://127.0.0.1:$PROXY/api/v1/accounts/1" "Authorization: Bearer $KEY"
  drive "$PROXY" "$n"
  kill -INT $pid; wait $pid || true
  grep -h '^summary:' "$out"* | awk '{s += $2} END {print s}'
}

PROXY=$(port)
sidecar_toml "$work/sidecar.toml" $PROXY $UP
s1=$(measure sidecar $N1 $BIN/permiso sidecar --config "$work/sidecar.toml")
s2=$(measure sidecar $N2 $BIN/permiso sidecar --config "$work/sidecar.toml")
b1=$(measure bare $N1 $BIN/permiso passthrough --listen 127.0.0.1:$PROXY --upstream 127.0.0.1:$UP)
b2=$(measure bare $N2 $BIN/permiso passthrough --listen 127.0.0.1:$PROXY --upstream 127.0.0.1:$UP)
p1=$(measure pproxy $N1 $BIN/permiso passthrough --pingora-proxy --listen 127.0.0.1:$PROXY --upstream 127.0.0.1:$UP)
p2=$(measure pproxy $N2 $BIN/permiso passthrough --pingora-proxy --listen 127.0.0.1:$PROXY --upstream 127.0.0.1:$UP)
n1=0; n2=0
if command -v nginx >/dev/null 2>&1; then
  # nginx as a plain reverse proxy, one process (no master) so callgrind sees all its work.
  nginx_proxy_conf "$work/nginx.conf" $PROXY $UP
  n1=$(measure nginx $N1 nginx -c "$work/nginx.conf" -p "$work")
  n2=$(measure nginx $N2 nginx -c "$work/nginx.conf" -p "$work")
fi
python3 - "$s1" "$s2" "$b1" "$b2" "$n1" "$n2" "$N1" "$N2" "$p1" "$p2" <<'PY'
import sys
s1, s2, b1, b2, n1, n2, r1, r2, p1, p2 = map(int, sys.argv[1:])
per = lambda a, b: (b - a) / (r2 - r1)
side, bare, pproxy = per(s1, s2), per(b1, b2), per(p1, p2)
print(f"instructions per request: sidecar {side:,.0f}, passthrough on the same path {bare:,.0f} "
      f"(auth and identity add {side - bare:,.0f}, {(side / bare - 1) * 100:+.1f} %), "
      f"pingora-proxy passthrough {pproxy:,.0f}")
if n2:
    ngx = per(n1, n2)
    print(f"nginx proxy_pass {ngx:,.0f}: the sidecar is {side / ngx:.2f}x nginx, the passthrough {bare / ngx:.2f}x, "
          f"pingora-proxy {pproxy / ngx:.2f}x")
PY
