#!/usr/bin/env bash
# The example deployment's PKI, made with the openssl CLI: a private CA, one server certificate
# per listener (admin plane, MT5 sidecar, account sidecar) and one client certificate for the
# MT5 API service, whose URI SAN spiffe://permiso/mt5-api-service is the identity the admin
# plane maps to that service (examples/setup.sh registers it as a tls_identity).
#
#   bash examples/certs.sh [OUT_DIR]        # default: examples/secrets
#
# Writes PEM files (keys mode 0600): ca.pem ca.key, admin.pem admin.key, mt5-sidecar.pem
# mt5-sidecar.key, account-sidecar.pem account-sidecar.key, mt5-api-service-cert.pem
# mt5-api-service-cert.key (the -cert suffix: examples/setup.sh writes the service's API key
# to mt5-api-service.key in the same directory). Server names cover both ways the deployment runs: docker compose
# (admin, mt5, account) and processes on one host (localhost, 127.0.0.1). ECDSA P-256 keys,
# leaf certificates valid 90 days (the sidecar warns 14 days before expiry); run the script
# again and SIGHUP (or just wait: the files are watched) to rotate. An existing CA is reused,
# so rotation keeps every peer's trust; delete ca.pem to start over.
#
# A throwaway CA for a demo. In production the certificates come from your PKI (cert-manager,
# Vault, SPIRE, step-ca); Permiso only reads the files.
set -euo pipefail
out=${1:-"$(dirname "$0")/secrets"}
mkdir -p "$out"
cd "$out"
umask 077
command -v openssl >/dev/null || { echo "certs.sh needs the openssl CLI" >&2; exit 1; }

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -s ca.pem ] || [ ! -s ca.key ]; then
  newkey ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=permiso example CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
fi

# issue NAME SUBJECT_ALT_NAMES EXTENDED_KEY_USAGE
issue() {
  local name=$1 san=$2 eku=$3 ext
  newkey "$name.key.new"
  ext=$(mktemp)
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
    "$eku" "$san" >"$ext"
  openssl req -new -key "$name.key.new" -subj "/CN=$name" \
    | openssl x509 -req -CA ca.pem -CAkey ca.key -CAcreateserial -days 90 -sha256 \
        -extfile "$ext" -out "$name.pem.new" 2>/dev/null
  rm -f "$ext"
  # Key first, then certificate, each replaced whole (rename): a watcher that reads between
  # the two sees a pair that does not match, refuses it and keeps the old one until the next.
  mv "$name.key.new" "$name.key"
  mv "$name.pem.new" "$name.pem"
}

local_names="DNS:localhost,IP:127.0.0.1"
issue admin "DNS:admin,$local_names" serverAuth
issue mt5-sidecar "DNS:mt5,$local_names" serverAuth
issue account-sidecar "DNS:account,$local_names" serverAuth
issue mt5-api-service-cert "URI:spiffe://permiso/mt5-api-service" clientAuth
rm -f ca.srl
chmod 0644 ./*.pem
echo "certificates written to $(pwd)/"
