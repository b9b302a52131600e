#!/usr/bin/env bash
# Registers the demo deployment's service accounts through the admin API and writes their
# credentials to examples/secrets/ (mode 0600; PERMISO_SECRETS_DIR to write elsewhere), where
# the sidecar configs read them.
#   PERMISO_ADMIN_API_KEY=... bash examples/setup.sh
# ADMIN_URL defaults to https://127.0.0.1:8000, verified against PERMISO_CA_FILE (default:
# secrets/ca.pem from examples/certs.sh). Needs curl and jq.
#
# Safe to run again (docker compose runs it on every `up`, on a persistent volume): a service
# whose credential files are all there is kept as it is; one registered earlier whose files are
# missing gets new credentials by rotation (grace 0: the lost ones stop). Each file is written
# to a temporary name and renamed only once complete, so a failed run never leaves an empty
# or half-written credential behind.
set -euo pipefail
ADMIN_URL=${ADMIN_URL:-https://127.0.0.1:8000}
: "${PERMISO_ADMIN_API_KEY:?set PERMISO_ADMIN_API_KEY}"
cd "$(dirname "$0")"
out=${PERMISO_SECRETS_DIR:-secrets}
PERMISO_CA_FILE=${PERMISO_CA_FILE:-$out/ca.pem}
umask 077
mkdir -p "$out"

api() { # method path [json-body] -> prints the response body; fails on any HTTP error
  curl -fsS --cacert "$PERMISO_CA_FILE" -X "$1" "$ADMIN_URL$2" \
    -H "X-Admin-Api-Key: $PERMISO_ADMIN_API_KEY" -H 'Content-Type: application/json' \
    ${3:+-d "$3"}
}

put() { # file value: written whole or not at all
  local tmp
  tmp=$(mktemp "$out/.$1.XXXXXX")
  printf '%s\n' "$2" > "$tmp"
  [ -n "$2" ] && [ "$2" != null ] || { rm -f "$tmp"; echo "empty value for $1" >&2; exit 1; }
  mv -f "$tmp" "$out/$1"
}

have() { # files... -> true when every one exists and is not empty
  local f
  for f in "$@"; do [ -s "$out/$f" ] || return 1; done
}

service_id() { # name -> its id, or nothing
  api GET "/auth/admin/services?limit=200" | jq -r --arg n "$1" '.services[] | select(.service_name == $n) | .service_id'
}

# account NAME SCOPES-JSON IDENTITIES-JSON KEY-FILE [SECRET-FILE CLIENT-ID-FILE]
account() {
  local name=$1 scopes=$2 ids=$3 keyf=$4 secf=${5:-} cidf=${6:-}
  if have "$keyf" ${secf:+"$secf"} ${cidf:+"$cidf"}; then
    echo "$name: kept (credentials already in $out/)"
    return
  fi
  local id resp
  id=$(service_id "$name")
  if [ -z "$id" ]; then
    resp=$(api POST /auth/admin/services "{\"service_name\":\"$name\",\"scopes\":$scopes,\"tls_identities\":$ids}")
    put "$keyf" "$(jq -r .api_key <<< "$resp")"
    [ -z "$secf" ] || put "$secf" "$(jq -r .client_secret <<< "$resp")"
    [ -z "$cidf" ] || put "$cidf" "$(jq -r .client_id <<< "$resp")"
    echo "$name: registered"
  else
    # Registered before, its credentials lost: new ones, the lost ones ended now.
    resp=$(api POST "/auth/admin/services/$id/rotate" '{"grace_seconds":0}')
    put "$keyf" "$(jq -r .api_key <<< "$resp")"
    if [ -n "$secf" ]; then
      resp=$(api POST "/auth/admin/services/$id/secret/rotate" '{"grace_seconds":0}')
      put "$secf" "$(jq -r .client_secret <<< "$resp")"
      put "$cidf" "$(jq -r .client_id <<< "$resp")"
    fi
    echo "$name: credentials were missing; rotated"
  fi
}

# Each sidecar pulls key state with its own sync:read key.
account mt5-sidecar '["sync:read"]' '[]' mt5-sidecar.sync
account account-sidecar '["sync:read"]' '[]' account-sidecar.sync

# The MT5 API calls the account service: its credentials live only in the MT5 sidecar, a key
# and the client certificate whose identity (from examples/certs.sh) is mapped to it here.
account mt5-api-service '["account:read","account:balance"]' '["spiffe://permiso/mt5-api-service"]' \
  mt5-api-service.key mt5-api-service.secret mt5-api-service.client_id

# A caller of the MT5 API (the trading dashboard of the seeds).
account trading-dashboard '["trade:read","trade:open","account:read","account:balance","market:data"]' '[]' \
  trading-dashboard.key

echo "credentials in $out/"
