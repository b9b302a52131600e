#!/usr/bin/env bash
# Registers the demo deployment's service accounts through the admin API and writes their
# credentials to examples/secrets/ (mode 0600; PERMISO_SECRETS_DIR to write elsewhere), where
# the sidecar configs read them.
#   PERMISO_ADMIN_API_KEY=... bash examples/setup.sh
# ADMIN_URL defaults to https://127.0.0.1:8000, verified against PERMISO_CA_FILE (default:
# secrets/ca.pem from examples/certs.sh). Needs curl and jq.
set -euo pipefail
ADMIN_URL=${ADMIN_URL:-https://127.0.0.1:8000}
: "${PERMISO_ADMIN_API_KEY:?set PERMISO_ADMIN_API_KEY}"
cd "$(dirname "$0")"
out=${PERMISO_SECRETS_DIR:-secrets}
PERMISO_CA_FILE=${PERMISO_CA_FILE:-$out/ca.pem}
umask 077
mkdir -p "$out"

create() { # name scopes-json [tls-identities-json] -> prints the create response
  curl -fsS --cacert "$PERMISO_CA_FILE" -X POST "$ADMIN_URL/auth/admin/services" \
    -H "X-Admin-Api-Key: $PERMISO_ADMIN_API_KEY" -H 'Content-Type: application/json' \
    -d "{\"service_name\":\"$1\",\"scopes\":$2,\"tls_identities\":${3:-[]}}"
}

# Each sidecar pulls key state with its own sync:read key.
create mt5-sidecar '["sync:read"]' | jq -r .api_key > "$out"/mt5-sidecar.sync
create account-sidecar '["sync:read"]' | jq -r .api_key > "$out"/account-sidecar.sync

# The MT5 API calls the account service: its credentials live only in the MT5 sidecar, a key
# and the client certificate whose identity (from examples/certs.sh) is mapped to it here.
mt5=$(create mt5-api-service '["account:read","account:balance"]' '["spiffe://permiso/mt5-api-service"]')
echo "$mt5" | jq -r .api_key > "$out"/mt5-api-service.key
echo "$mt5" | jq -r .client_secret > "$out"/mt5-api-service.secret
echo "$mt5" | jq -r .client_id > "$out"/mt5-api-service.client_id

# A caller of the MT5 API (the trading dashboard of the seeds).
create trading-dashboard '["trade:read","trade:open","account:read","account:balance","market:data"]' \
  | jq -r .api_key > "$out"/trading-dashboard.key

echo "credentials written to $out/"
