# Shared by the shell benches (callgrind.sh, syscalls.sh, wrk.sh), sourced after they set
# BIN and work: free ports, waiting for an HTTP answer, an admin plane with a sync key and a
# caller, and a sidecar config for /api/v1/accounts.

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 600); do curl -fs -o /dev/null "$1" ${2:+-H "$2"} && return 0; sleep 0.1; done; echo "timeout: $1" >&2; return 1; }

# Starts `permiso admin` on $ADMIN, writes the sidecar's sync key to $work/sync.key and the
# caller service (scope account:read) as JSON to $work/caller.json; sets KEY to its API key.
start_admin() {
  ADMIN=$(port)
  $BIN/permiso admin --listen 127.0.0.1:$ADMIN --database "$work/p.db" >"$work/admin.log" 2>&1 &
  wait_http "http://127.0.0.1:$ADMIN/healthz"
  create() { curl -fsS -X POST "http://127.0.0.1:$ADMIN/auth/admin/services" -H "X-Admin-Api-Key: $PERMISO_ADMIN_API_KEY" \
    -H 'Content-Type: application/json' -d "{\"service_name\":\"$1\",\"scopes\":$2}"; }
  create bench-sync '["sync:read"]' | python3 -c 'import sys,json; print(json.load(sys.stdin)["api_key"])' >"$work/sync.key"
  create bench-caller '["account:read"]' >"$work/caller.json"
  KEY=$(python3 -c 'import sys,json; print(json.load(open(sys.argv[1]))["api_key"])' "$work/caller.json")
}

# sidecar_toml FILE LISTEN_PORT UPSTREAM_PORT [extra [sidecar] lines]
sidecar_toml() {
  cat >"$1" <<TOML
[sidecar]
listen = "127.0.0.1:$2"
upstream = "127.0.0.1:$3"
snapshot_file = "$work/snap.json"
${4:-}
[sidecar.sync]
admin_url = "http://127.0.0.1:$ADMIN"
credential_file = "$work/sync.key"
[[sidecar.routes]]
prefix = "/api/v1/accounts"
scopes = ["account:read"]
TOML
}

# nginx_proxy_conf FILE LISTEN_PORT UPSTREAM_PORT: nginx as a plain reverse proxy, one process
# (no master, no daemon) so a tracer attached to it sees all its work.
nginx_proxy_conf() {
  cat >"$1" <<NGINX
daemon off;
master_process off;
worker_processes 1;
pid $1.pid;
error_log $1.err;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  upstream u { server 127.0.0.1:$3; keepalive 64; }
  server { listen 127.0.0.1:$2; location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
NGINX
}
