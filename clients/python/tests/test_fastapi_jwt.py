"""permiso.fastapi standalone, verifying the admin plane's RFC 9068 tokens locally against
its real JWKS (no sidecar)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from typing import Any

import httpx
from conftest import (
    CALLER_ADDRESS,
    FakeClock,
    Stack,
    async_client_from,
    client_from,
    free_port,
    protected_app,
    wait_until,
)

from permiso import TokenClient
from permiso.fastapi import PermisoAuth

REALM = 'Bearer realm="permiso"'
INVALID = f'{REALM}, error="invalid_token", error_description="The access token is invalid, expired or revoked"'
JWKS = "/.well-known/jwks.json"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    h, p, sig = token.split(".")
    return json.loads(unb64(h)), json.loads(unb64(p)), sig


def encode(header: dict[str, Any], payload: dict[str, Any], sig: str) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{sig}"


class Jwt:
    """Admin plane (new keys sign at once) + the test app verifying its tokens locally."""

    def __init__(self, stack: Stack, clock: FakeClock, audience: str = "permiso", **options: Any) -> None:
        self.admin = stack.admin(signing_key_publish_delay_seconds=0)
        self.app, self.seen = protected_app(
            lambda app: PermisoAuth.jwt(app, issuer=self.admin.url, audience=audience, clock=clock, **options)
        )
        self.server = stack.serve(self.app)
        self.url = self.server.url

    def token(self, svc: dict[str, Any], scope: str | None = None) -> str:
        tc = TokenClient(self.admin.token_url, svc["service_id"], svc["client_secret"], scope=scope)
        try:
            return tc.get_token()
        finally:
            tc.close()

    def get(self, path: str, token: str | None, method: str = "GET") -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with client_from(CALLER_ADDRESS) as http:
            return http.request(method, self.url + path, headers=headers)


def test_a_valid_token_and_what_it_may_do(stack: Stack, clock: FakeClock) -> None:
    env = Jwt(stack, clock)
    dash = env.admin.create_service("trading-dashboard", ["trade:read", "account:read"])
    ops = env.admin.create_service("ops-console", ["admin:*"], is_trusted=True)
    token = env.token(dash)
    r = env.get("/api/v1/whoami", token)
    assert r.status_code == 200
    _, claims, _ = parts(token)
    assert r.json() == {
        "service_id": dash["service_id"],
        "scopes": ["trade:read", "account:read"],
        "trusted": False,
        "service_name": None,
        "key_id": None,
        "token_id": claims["jti"],
        "environment": None,
        "client_cert_identity": None,
        "via": "jwt",
    }
    assert env.get("/api/v1/trades", token).status_code == 200
    r = env.get("/api/v1/trades", token, "POST")
    assert (
        r.status_code == 403
        and r.headers["www-authenticate"] == f'{REALM}, error="insufficient_scope", scope="trade:open"'
    )
    # A narrower token is held to its own scopes.
    r = env.get("/api/v1/trades", env.token(dash, scope="trade:read"))
    assert r.headers["www-authenticate"].endswith('scope="trade:read account:read"')
    # Trust comes from the token's is_trusted claim.
    assert env.get("/api/v1/admin/stats", env.token(ops)).status_code == 200
    r = env.get("/api/v1/admin/stats", token)
    assert r.status_code == 403 and r.json()["error"] == "access_denied"
    assert env.admin.requests_to(JWKS) == 1  # fetched once, then cached


def test_expired_and_not_yet_valid_on_the_injected_clock(stack: Stack, clock: FakeClock) -> None:
    env = Jwt(stack, clock)
    svc = env.admin.create_service("short-lived", ["trade:read"], access_token_lifetime=60)
    token = env.token(svc)
    _, claims, _ = parts(token)
    clock.now = claims["exp"] + 29  # inside the 30 s leeway
    assert env.get("/api/v1/whoami", token).status_code == 200
    clock.now = claims["exp"] + 30
    r = env.get("/api/v1/whoami", token)
    assert r.status_code == 401 and r.headers["www-authenticate"] == INVALID
    assert r.json() == {
        "error": "invalid_token",
        "error_description": "The access token is invalid, expired or revoked",
    }
    clock.now = claims["nbf"] - 31
    assert env.get("/api/v1/whoami", token).status_code == 401
    clock.now = claims["nbf"] - 30
    assert env.get("/api/v1/whoami", token).status_code == 200


def test_wrong_audience_and_wrong_issuer(stack: Stack, clock: FakeClock) -> None:
    env = Jwt(stack, clock, audience="mt5-api")  # the admin plane mints aud "permiso"
    svc = env.admin.create_service("dashboard", ["trade:read"])
    token = env.token(svc)
    r = env.get("/api/v1/whoami", token)
    assert r.status_code == 401 and r.headers["www-authenticate"] == INVALID
    other, _ = protected_app(
        lambda app: PermisoAuth.jwt(
            app, issuer="https://auth.example", audience="permiso", jwks_url=env.admin.url + JWKS, clock=clock
        )
    )
    server = stack.serve(other)
    assert httpx.get(server.url + "/api/v1/whoami", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert env.seen == []


def test_forged_tokens(stack: Stack, clock: FakeClock) -> None:
    env = Jwt(stack, clock)
    svc = env.admin.create_service("dashboard", ["trade:read"])
    token = env.token(svc)
    assert env.get("/api/v1/whoami", token).status_code == 200
    header, claims, sig = parts(token)
    jwk = httpx.get(env.admin.url + JWKS).json()["keys"][0]
    public_raw = unb64(jwk["x"])
    elevated = {**claims, "scope": "admin:* trade:*", "is_trusted": True}

    def hs256(key: bytes) -> str:
        h = {**header, "alg": "HS256"}
        signing_input = f"{b64(json.dumps(h).encode())}.{b64(json.dumps(elevated).encode())}"
        return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"

    forgeries = {
        "alg none, no signature": encode({**header, "alg": "none"}, elevated, ""),
        "alg none, the real signature": encode({**header, "alg": "none"}, elevated, sig),
        "HS256 keyed with the public key": hs256(public_raw),
        "HS256 keyed with the JWK text": hs256(json.dumps(jwk).encode()),
        "HS256 keyed with the base64 x": hs256(jwk["x"].encode()),
        "claims changed under the real signature": encode(header, elevated, sig),
        "typ changed": encode({**header, "typ": "JWT"}, claims, sig),
        "no kid": encode({k: v for k, v in header.items() if k != "kid"}, claims, sig),
        "not a JWT": "svc_live_" + "A" * 49,
        "garbage": "eyJ.eyJ.x",
    }
    for what, forged in forgeries.items():
        r = env.get("/api/v1/admin/stats", forged)
        assert r.status_code == 401, what
        assert r.headers["www-authenticate"] == INVALID, what
    # No credential at all, or another scheme: 401 without an error code, as the sidecar.
    for headers in ({}, {"Authorization": f"Basic {b64(b'a:b')}"}, {"Authorization": token}):
        r = httpx.get(env.url + "/api/v1/whoami", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == REALM
    # Two Authorization headers: 400, as the sidecar.
    r = httpx.get(env.url + "/api/v1/whoami", headers=[("Authorization", f"Bearer {token}")] * 2)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert env.seen == ["whoami"]


def test_unknown_kid_after_a_signing_key_rotation_refetches_the_key_set(stack: Stack, clock: FakeClock) -> None:
    env = Jwt(stack, clock, refetch_interval=5)
    svc = env.admin.create_service("dashboard", ["trade:read"])
    before = env.token(svc)
    assert env.get("/api/v1/whoami", before).status_code == 200
    assert env.admin.requests_to(JWKS) == 1
    new_kid = env.admin.rotate_signing_key()  # signs at once (publish delay 0)
    after = env.token(svc)
    assert parts(after)[0]["kid"] == new_kid != parts(before)[0]["kid"]
    clock.advance(10)
    assert env.get("/api/v1/whoami", after).status_code == 200  # unknown kid: refetched
    assert env.get("/api/v1/whoami", before).status_code == 200  # the old key is still published
    assert env.admin.requests_to(JWKS) == 2
    # Invented kids cannot make it hammer the admin plane: one refetch per interval.
    h, c, s = parts(after)
    invented = encode({**h, "kid": "k-invented"}, c, s)
    for _ in range(5):
        assert env.get("/api/v1/whoami", invented).status_code == 401
    assert env.admin.requests_to(JWKS) == 2
    clock.advance(5)
    assert env.get("/api/v1/whoami", invented).status_code == 401
    assert env.admin.requests_to(JWKS) == 3


def test_key_set_unreachable_fails_closed_with_503(stack: Stack, clock: FakeClock) -> None:
    admin = stack.admin()
    svc = admin.create_service("dashboard", ["trade:read"])
    app, _ = protected_app(
        lambda app: PermisoAuth.jwt(
            app, issuer=admin.url, audience="permiso", jwks_url=f"http://127.0.0.1:{free_port()}{JWKS}", clock=clock
        )
    )
    server = stack.serve(app)
    tc = TokenClient(admin.token_url, svc["service_id"], svc["client_secret"])
    r = httpx.get(server.url + "/api/v1/whoami", headers={"Authorization": f"Bearer {tc.get_token()}"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == "temporarily_unavailable"
    tc.close()


def test_a_stale_key_set_is_renewed_in_the_background_and_kept_when_that_fails(stack: Stack, clock: FakeClock) -> None:
    env = Jwt(stack, clock, jwks_ttl=60, refetch_interval=5)
    svc = env.admin.create_service("dashboard", ["trade:read", "account:read"])
    token = env.token(svc)
    assert env.get("/api/v1/whoami", token).status_code == 200
    assert env.admin.requests_to(JWKS) == 1
    # Past the TTL with the admin plane up: answered from the known key, renewed behind.
    clock.advance(61)
    assert env.get("/api/v1/whoami", token).status_code == 200
    wait_until(lambda: env.admin.requests_to(JWKS) == 2, what="the background JWKS fetch")
    # Past it again with the admin plane gone: the known key still answers, at once.
    env.admin.stop()
    clock.advance(61)
    for _ in range(3):
        r = env.get("/api/v1/whoami", token)
        assert r.status_code == 200, r.text
    # A refusal still needs a known key: an unknown kid is 401, not a wait.
    header, payload, sig = parts(token)
    assert env.get("/api/v1/whoami", encode({**header, "kid": "invented"}, payload, sig)).status_code == 401


def test_requests_arriving_during_a_key_set_fetch_wait_for_it(stack: Stack, clock: FakeClock) -> None:
    env = Jwt(stack, clock)
    svc = env.admin.create_service("dashboard", ["trade:read", "account:read"])
    token = env.token(svc)

    async def burst() -> list[int]:
        async with async_client_from(CALLER_ADDRESS, headers={"Authorization": f"Bearer {token}"}) as http:
            rs = await asyncio.gather(*(http.get(env.url + "/api/v1/whoami") for _ in range(20)))
        return [r.status_code for r in rs]

    # First use: twenty at once, one fetch, all answered from it (none told 503).
    assert asyncio.run(burst()) == [200] * 20
    assert env.admin.requests_to(JWKS) == 1
    # After a rotation the new kid is unknown: the same, one fetch for all of them.
    env.admin.rotate_signing_key()
    token = env.token(svc)
    clock.advance(5)
    assert asyncio.run(burst()) == [200] * 20
    assert env.admin.requests_to(JWKS) == 2
