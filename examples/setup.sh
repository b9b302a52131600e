#!/usr/bin/env bash
# Registers the demo deployment's service accounts through the admin API and writes their
# credentials to examples/secrets/ (mode 0600), where the sidecar configs read them.
#   PERMISO_ADMIN_API_KEY=... ADMIN_URL=http://127.0.0.1:8000 bash examples/setup.sh
# Needs curl and jq.
set -euo pipefail
ADMIN_URL=${ADMIN_URL:-http://127.0.0.1:8000}
: "${PERMISO_ADMIN_API_KEY:?set PERMISO_ADMIN_API_KEY}"
cd "$(dirname "$0")"
umask 077
mkdir -p secrets

create() { # name scopes-json -> prints the create response
  curl -fsS -X POST "$ADMIN_URL/auth/admin/services" \
    -H "X-Admin-Api-Key: $PERMISO_ADMIN_API_KEY" -H 'Content-Type: application/json' \
    -d "{\"service_name\":\"$1\",\"scopes\":$2}"
}

# Each sidecar pulls key state with its own sync:read key.
create mt5-sidecar '["sync:read"]' | jq -r .api_key > secrets/mt5-sidecar.sync
create account-sidecar '["sync:read"]' | jq -r .api_key > secrets/account-sidecar.sync

# The MT5 API calls the account service: its credential lives only in the MT5 sidecar.
mt5=$(create mt5-api-service '["account:read","account:balance"]')
echo "$mt5" | jq -r .api_key > secrets/mt5-api-service.key
echo "$mt5" | jq -r .client_secret > secrets/mt5-api-service.secret
echo "$mt5" | jq -r .client_id > secrets/mt5-api-service.client_id

# A caller of the MT5 API (the trading dashboard of the seeds).
create trading-dashboard '["trade:read","trade:open","account:read","account:balance","market:data"]' \
  | jq -r .api_key > secrets/trading-dashboard.key

echo "credentials written to $(pwd)/secrets/"
