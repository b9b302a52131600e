#!/usr/bin/env python3
"""Writes the seed corpora fuzz/corpus/<target>/seed-*.

Deterministic: the API keys and the Ed25519 token-signing key derive from fixed labels, and the
authorization_header target hard-codes the same keys (and the public half of the signing key)
in its fixture, so seeded requests are allowed all the way through `decide`.

Needs the `blake3` and `cryptography` Python packages:
    python3 -m venv /tmp/seedenv && /tmp/seedenv/bin/pip install blake3 cryptography
    /tmp/seedenv/bin/python fuzz/gen_seeds.py
Only rerun it when the key format or the checksum context in crates/core/src/key.rs changes.
"""
import base64
import hashlib
import json
import os
import shutil

import blake3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CORPUS = os.path.join(HERE, "corpus")
NOW = 1_800_000_000


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


# crates/core/src/key.rs: derive_key(CHECKSUM_CONTEXT, b"checksum key"), keyed blake3 of prefix+body,
# first 4 bytes in base64url.
CHECKSUM_KEY = blake3.blake3(
    b"checksum key", derive_key_context="permiso 2026-11 api key checksum v1"
).digest()


def api_key(prefix: str, label: str) -> str:
    body = b64(hashlib.sha256(label.encode()).digest())
    signed = prefix + body
    return signed + b64(blake3.blake3(signed.encode(), key=CHECKSUM_KEY).digest()[:4])


def key_hash(key: str) -> str:
    return blake3.blake3(key.encode()).hexdigest()


LIVE_A = api_key("svc_live_", "permiso-fuzz-live")
LIVE_B = api_key("svc_live_", "permiso-fuzz-live-2")
LIVE_ENDED = api_key("svc_live_", "permiso-fuzz-live-3")
TEST_T = api_key("svc_test_", "permiso-fuzz-test")

SIGNER = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"permiso-fuzz-ed25519").digest())
SEED_X = b64(
    SIGNER.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
)


def jwt(kid="k1", typ="at+jwt", **overrides) -> str:
    claims = {
        "iss": "https://auth",
        "sub": "srv_a",
        "aud": "permiso",
        "exp": NOW + 600,
        "iat": NOW,
        "nbf": NOW,
        "jti": "j1",
        "client_id": "srv_a",
        "scope": "trade:read account:read",
    }
    claims.update(overrides)
    header = b64(json.dumps({"typ": typ, "alg": "EdDSA", "kid": kid}, separators=(",", ":")).encode())
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = SIGNER.sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{b64(signature)}"


def write(target: str, name: str, data) -> None:
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, f"seed-{name}"), "wb") as f:
        f.write(data)


def main() -> None:
    # key_parse
    write("key_parse", "live", LIVE_A)
    write("key_parse", "test", TEST_T)
    write("key_parse", "typo", LIVE_A[:-1] + ("A" if LIVE_A[-1] != "A" else "B"))
    write("key_parse", "client-secret", "pcs_" + b64(hashlib.sha256(b"pcs").digest()))
    write("key_parse", "multibyte", LIVE_A[:20] + "é" + LIVE_A[22:])

    # authorization_header: flags byte, path, '\n', header value.
    # flags: bits 0-1 method (GET, POST, DELETE, OPTIONS), 2-3 auth (One, One, Absent, Several),
    # 4-5 client (none, 127.0.0.1, 10.1.2.3, ::ffff:10.9.9.9), 6-7 sidecar (live, live, test, none).
    def req(flags: int, path: str, header: str) -> bytes:
        return bytes([flags]) + path.encode() + b"\n" + header.encode()

    ah = "authorization_header"
    write(ah, "key-allowed", req(0x10, "/api/v1/trades/7?x=1", f"Bearer {LIVE_A}"))
    write(ah, "key-ratelimited-ip", req(0x20, "/api/v1/market/EURUSD", f"bearer  {LIVE_B} "))
    write(ah, "key-grace-ended", req(0x11, "/api/v1/trades", f"Bearer {LIVE_ENDED}"))
    write(ah, "key-test-env", req(0x80, "/api/v1/admin/x", f"Bearer {TEST_T}"))
    write(ah, "jwt-allowed", req(0x10, "/api/v1/trades/1", f"Bearer {jwt()}"))
    write(ah, "jwt-revoked", req(0x10, "/api/v1/trades", f"Bearer {jwt(jti='revoked-1')}"))
    write(ah, "jwt-disabled", req(0x10, "/api/v1/trades", f"Bearer {jwt(client_id='srv_off')}"))
    write(ah, "jwt-scope", req(0x10, "/api/v1/account/balance", f"Bearer {jwt(scope='account:*')}"))
    write(ah, "basic", req(0x00, "/api/v1/account", "Basic Zm9vOmJhcg=="))
    write(ah, "public", req(0x0b, "/health", ""))
    write(ah, "dot-segment", req(0x00, "/health/%2e%2E/api/v1/admin", "Bearer x"))

    # jwt_parse
    write("jwt_parse", "valid", jwt())
    write("jwt_parse", "expired", jwt(exp=NOW - 100, nbf=NOW - 700))
    write("jwt_parse", "wrong-typ", jwt(typ="JWT"))
    write("jwt_parse", "other-kid", jwt(kid="k2"))
    none_header = b64(json.dumps({"alg": "none", "typ": "at+jwt", "kid": "k1"}).encode())
    write("jwt_parse", "alg-none", none_header + "." + jwt().split(".")[1] + ".")

    # config_parse
    shutil.copyfile(os.path.join(ROOT, "config.toml"), os.path.join(CORPUS, "config_parse", "seed-config.toml"))
    write(
        "config_parse",
        "egress.toml",
        """[admin_plane]
listen = "[::1]:8000"
issuer = "https://permiso.internal"

[sidecar]
upstream = "127.0.0.1:8001"
environment = "test"
admin_listen = "127.0.0.1:9901"

[sidecar.sync]
admin_url = "https://127.0.0.1:8000/"
credential_file = "/run/secrets/sync"

[sidecar.tokens]
leeway_seconds = 300

[sidecar.egress]
listen = "127.0.0.1:9100"

[sidecar.egress.destinations.account]
url = "http://127.0.0.1:9002"
api_key_env = "PERMISO_FUZZ_KEY"

[sidecar.egress.destinations.market-data]
url = "http://127.0.0.1:9003/"
client_id = "srv_a"
client_secret_file = "secret"
scopes = ["market:data", "account:*"]

[[sidecar.routes]]
prefix = "/"
methods = ["options"]
public = true

[[sidecar.routes]]
prefix = "/api/v1/trades/"
methods = ["GET", "POST"]
scopes = ["trade:*"]
""",
    )

    # sync_payload: seed-full.json is also the base snapshot the target applies deltas to.
    def service(sid, env, scopes, keys, **kw):
        s = {
            "service_id": sid,
            "service_name": f"name-{sid}",
            "environment": env,
            "scopes": scopes,
            "disabled": False,
            "rate_limit_per_minute": None,
            "rate_limit_per_hour": None,
            "allowed_ips": [],
            "keys": keys,
        }
        s.update(kw)
        return s

    def sync_key(kid, key, expires_at=None):
        return {"key_id": kid, "hash": key_hash(key), "expires_at": expires_at}

    full = {
        "epoch": "e1",
        "version": 3,
        "full": True,
        "services": [
            service("srv_a", "live", ["trade:*", "account:read"],
                    [sync_key("key_a", LIVE_A), sync_key("key_ended", LIVE_ENDED, NOW - 1)]),
            service("srv_b", "live", ["market:data"], [sync_key("key_b", LIVE_B, NOW + 3600)],
                    rate_limit_per_minute=60, rate_limit_per_hour=1000,
                    allowed_ips=["10.0.0.0/8", "192.168.1.7", "::ffff:10.0.0.0/104"]),
            service("srv_t", "test", ["admin:*"], [sync_key("key_t", TEST_T)], disabled=True),
        ],
        "issuer": "https://auth",
        "signing_keys": [{"kid": "k1", "x": SEED_X}],
        "revoked_tokens": [{"jti": "revoked-1", "expires_at": NOW + 3600}],
    }
    write("sync_payload", "full.json", json.dumps(full, indent=1) + "\n")
    delta = {
        "epoch": "e1",
        "version": 4,
        "full": False,
        "services": [
            # srv_b first: its key moves to srv_a, and a delta is applied in order.
            service("srv_b", "live", ["market:data"], [], rate_limit_per_minute=60,
                    rate_limit_per_hour=1000),
            service("srv_a", "live", ["trade:open"], [sync_key("key_b2", LIVE_B)]),
        ],
        "issuer": "https://auth",
        "signing_keys": [],
        "revoked_tokens": [],
        "generated_at_ms": NOW * 1000,
    }
    write("sync_payload", "delta.json", json.dumps(delta) + "\n")
    move = dict(delta, services=[service("srv_a", "test", [], [])], version=3)
    write("sync_payload", "delta-env-change.json", json.dumps(move) + "\n")


if __name__ == "__main__":
    main()
