#!/usr/bin/env bash
# System calls and futex wake-ups per proxied request, counted by strace -c -f over a wrk run:
# the sidecar (valid key), the passthrough on the same HTTP/1 path, pingora-proxy as a
# passthrough, and nginx proxy_pass, each with one worker.
#   cargo build --release --bins && bash benches/syscalls.sh
# Needs strace, wrk, curl, python3 (and nginx for its row). strace slows every proxy alike;
# the counts, not the rates, are the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
SECS=${SECS:-4}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export PERMISO_ADMIN_API_KEY=syscalls-admin-key-0123456789 RUST_LOG=warn

. benches/support/env.sh
UP=$(port)
$BIN/account-demo --listen 127.0.0.1:$UP >"$work/up.log" 2>&1 &
start_admin

# Runs wrk against $1 while strace counts the syscalls of process $2; prints one row.
count() { # name port pid
  local name=$1 p=$2 pid=$3 file="$work/strace.$2"
  wrk -t1 -c32 -d1s -H "Authorization: Bearer $KEY" "http://127.0.0.1:$p/api/v1/accounts/1" >/dev/null
  strace -c -f -p "$pid" -o "$file" 2>/dev/null &
  local st=$!
  sleep 0.5
  local out
  out=$(wrk -t1 -c32 -d${SECS}s -H "Authorization: Bearer $KEY" "http://127.0.0.1:$p/api/v1/accounts/1")
  kill -INT $st; wait $st 2>/dev/null || true
  local n
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  python3 - "$name" "$n" "$file" <<'PY'
import sys, re
name, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls, futex, top = 0, 0, []
for line in open(path):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] not in ("total",):
        c = int(f[3]); calls += c
        if f[-1] == "futex": futex += c
        top.append((c, f[-1]))
top.sort(reverse=True)
print(f"| {name} | {n} | {calls / n:.2f} | {futex / n:.3f} | " + ", ".join(f"{s} {c / n:.2f}" for c, s in top[:6]) + " |")
PY
}

PROXY=$(port)
sidecar_toml "$work/sidecar.toml" $PROXY $UP
echo "| proxy (1 worker, wrk -t1 -c32) | requests | syscalls/request | futex/request | most frequent, per request |"
echo "|---|---|---|---|---|"
$BIN/permiso sidecar --config "$work/sidecar.toml" >"$work/sidecar.log" 2>&1 &
S=$!
wait_http "http://127.0.0.1:$PROXY/api/v1/accounts/1" "Authorization: Bearer $KEY"
count "sidecar, valid key" $PROXY $S
kill $S; wait $S 2>/dev/null || true
BP=$(port)
$BIN/permiso passthrough --listen 127.0.0.1:$BP --upstream 127.0.0.1:$UP >"$work/bare.log" 2>&1 &
B=$!
wait_http "http://127.0.0.1:$BP/api/v1/accounts/1" "Authorization: Bearer $KEY"
count "passthrough, same HTTP/1 path" $BP $B
kill $B; wait $B 2>/dev/null || true
PP=$(port)
$BIN/permiso passthrough --pingora-proxy --listen 127.0.0.1:$PP --upstream 127.0.0.1:$UP >"$work/pp.log" 2>&1 &
P=$!
wait_http "http://127.0.0.1:$PP/api/v1/accounts/1" "Authorization: Bearer $KEY"
count "pingora-proxy passthrough" $PP $P
kill $P; wait $P 2>/dev/null || true
if command -v nginx >/dev/null 2>&1; then
  NP=$(port)
  nginx_proxy_conf "$work/nginx.conf" $NP $UP
  nginx -c "$work/nginx.conf" -p "$work" &
  N=$!
  wait_http "http://127.0.0.1:$NP/api/v1/accounts/1"
  count "nginx proxy_pass" $NP $N
fi
