#!/usr/bin/env bash
# The issue-15 comparison as a new user would run it: wrk against nginx proxy_pass, haproxy
# (when installed), the passthrough on the sidecar's HTTP/1 path, pingora-proxy as a
# passthrough, and the sidecar (valid API key, cached JWT), all in front of the same nginx
# `return 200` upstream, in interleaved rounds; req/s, CPU µs per request (utime + stime of
# the proxy's processes over the run, from /proc) and wrk's latency percentiles.
#   cargo build --release --bins && bash benches/wrk.sh
#   THREADS=2 CONNS=256 ROUNDS=3 SECS=8 bash benches/wrk.sh
# THREADS: worker threads of the sidecar and the passthroughs, worker processes of nginx,
# threads of haproxy. Needs wrk, nginx, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
THREADS=${THREADS:-1}; CONNS=${CONNS:-32}; ROUNDS=${ROUNDS:-3}; SECS=${SECS:-8}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export PERMISO_ADMIN_API_KEY=wrk-admin-key-0123456789abcdef RUST_LOG=warn
TICKS=$(getconf CLK_TCK)

. benches/support/env.sh
nginx_conf() { # file port body-of-location workers
  cat >"$1" <<NGINX
worker_processes $4;
pid $1.pid;
error_log $1.err;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  upstream u { server 127.0.0.1:$UP; keepalive 512; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$2; location / { $3 } }
}
NGINX
}

# The upstream: nginx answering 200 itself, two workers so it is never the bottleneck.
UP=$(port)
nginx_conf "$work/up.conf" $UP 'return 200 "ok";' 2
nginx -c "$work/up.conf" -p "$work" -g 'daemon off;' &
wait_http "http://127.0.0.1:$UP/"

start_admin
SID=$(python3 -c 'import sys,json; print(json.load(open(sys.argv[1]))["service_id"])' "$work/caller.json")
SECRET=$(python3 -c 'import sys,json; print(json.load(open(sys.argv[1]))["client_secret"])' "$work/caller.json")
TOKEN=$(curl -fsS -u "$SID:$SECRET" -d grant_type=client_credentials "http://127.0.0.1:$ADMIN/oauth/token" \
  | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')

declare -A PORT PIDS AUTH
SC=$(port)
sidecar_toml "$work/sidecar.toml" $SC $UP "threads = $THREADS
max_requests_per_connection = 1000000"
$BIN/permiso sidecar --config "$work/sidecar.toml" >"$work/sidecar.log" 2>&1 &
PORT[sidecar-key]=$SC; PIDS[sidecar-key]=$!; AUTH[sidecar-key]="Bearer $KEY"
PORT[sidecar-jwt]=$SC; PIDS[sidecar-jwt]=$!; AUTH[sidecar-jwt]="Bearer $TOKEN"
BP=$(port)
$BIN/permiso passthrough --threads $THREADS --listen 127.0.0.1:$BP --upstream 127.0.0.1:$UP >"$work/bare.log" 2>&1 &
PORT[passthrough]=$BP; PIDS[passthrough]=$!
PP=$(port)
$BIN/permiso passthrough --pingora-proxy --threads $THREADS --listen 127.0.0.1:$PP --upstream 127.0.0.1:$UP >"$work/pp.log" 2>&1 &
PORT[pingora-proxy]=$PP; PIDS[pingora-proxy]=$!
NP=$(port)
nginx_conf "$work/proxy.conf" $NP 'proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection "";' $THREADS
nginx -c "$work/proxy.conf" -p "$work" -g 'daemon off;' &
PORT[nginx]=$NP; PIDS[nginx]=$!
NAMES=(nginx passthrough sidecar-key sidecar-jwt pingora-proxy)
if command -v haproxy >/dev/null 2>&1; then
  HP=$(port)
  printf 'global\n  nbthread %s\n  maxconn 8192\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\nfrontend f\n  bind 127.0.0.1:%s\n  default_backend b\nbackend b\n  server u 127.0.0.1:%s\n' \
    "$THREADS" "$HP" "$UP" >"$work/haproxy.cfg"
  haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
  PORT[haproxy]=$HP; PIDS[haproxy]=$!
  NAMES+=(haproxy)
fi
for n in "${NAMES[@]}"; do
  wait_http "http://127.0.0.1:${PORT[$n]}/api/v1/accounts/1" "Authorization: ${AUTH[$n]:-none}"
done

# CPU ticks of a process and its children (nginx's workers).
ticks() { python3 - "$1" <<'PY'
import os, sys
root = int(sys.argv[1]); total = 0
for p in os.listdir('/proc'):
    if not p.isdigit(): continue
    try:
        f = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()
    except OSError:
        continue
    pid, ppid = int(p), int(f[1])
    if pid == root or ppid == root:
        total += int(f[11]) + int(f[12])
print(total)
PY
}

echo "wrk -t$THREADS -c$CONNS -d${SECS}s, keep-alive, $ROUNDS interleaved rounds; $THREADS worker(s) each; upstream: nginx return 200" >&2
for r in $(seq 1 "$ROUNDS"); do
  for n in "${NAMES[@]}"; do
    h=()
    [ -n "${AUTH[$n]:-}" ] && h=(-H "Authorization: ${AUTH[$n]}")
    wrk -t"$THREADS" -c"$CONNS" -d1s "${h[@]}" "http://127.0.0.1:${PORT[$n]}/api/v1/accounts/1" >/dev/null
    c0=$(ticks "${PIDS[$n]}")
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" --latency "${h[@]}" "http://127.0.0.1:${PORT[$n]}/api/v1/accounts/1")
    c1=$(ticks "${PIDS[$n]}")
    echo "$out" | grep -q "Non-2xx" && { echo "$n: non-2xx answers" >&2; echo "$out" >&2; exit 1; }
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    echo "$r $n $rps $(python3 -c "print(($c1 - $c0) / $TICKS * 1e6 / $reqs)") $p50 $p99" >>"$work/rows"
  done
done
python3 - "$work/rows" "$THREADS" "$CONNS" <<'PY'
import sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r, n, rps, cpu, p50, p99 = line.split()
    rows[n].append((float(rps), float(cpu), p50, p99))
def rng(v, f="{:.0f}"):
    lo, hi = min(v), max(v)
    return f.format(lo) if f.format(lo) == f.format(hi) else f"{f.format(lo)}–{f.format(hi)}"
label = {"nginx": "nginx proxy_pass", "haproxy": "haproxy", "passthrough": "passthrough (sidecar's HTTP/1 path, no auth)",
         "pingora-proxy": "pingora-proxy passthrough (before issue 15)", "sidecar-key": "sidecar, valid API key",
         "sidecar-jwt": "sidecar, cached JWT"}
med = lambda v: sorted(v)[len(v) // 2]
ng = rows["nginx"]; pt = rows["passthrough"]
print(f"\n{sys.argv[2]} worker(s), {sys.argv[3]} connections; ranges over the rounds, ratios of medians\n")
print("| proxy | req/s | CPU µs/req | p50 | p99 | req/s × nginx | CPU × nginx | req/s × passthrough |")
print("|---|---|---|---|---|---|---|---|")
for n in ["nginx", "haproxy", "passthrough", "pingora-proxy", "sidecar-key", "sidecar-jwt"]:
    if n not in rows: continue
    v = rows[n]
    rps = [x[0] for x in v]; cpu = [x[1] for x in v]
    print(f"| {label[n]} | {rng(rps)} | {rng(cpu, '{:.1f}')} | {', '.join(x[2] for x in v)} | {', '.join(x[3] for x in v)} | "
          f"{med(rps) / med([x[0] for x in ng]):.2f} | {med(cpu) / med([x[1] for x in ng]):.2f} | {med(rps) / med([x[0] for x in pt]):.2f} |")
PY
