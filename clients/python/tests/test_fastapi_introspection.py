"""permiso.fastapi standalone with RFC 7662 introspection against the real admin plane, and
its cache: a revoked token is refused once its cached answer is cache_ttl old."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from conftest import CALLER_ADDRESS, FakeClock, Stack, async_client_from, client_from, free_port, protected_app

from permiso import TokenClient
from permiso.fastapi import PermisoAuth

INTROSPECT = "/oauth/introspect"
INVALID = (
    'Bearer realm="permiso", error="invalid_token", error_description="The access token is invalid, expired or revoked"'
)


class Introspected:
    def __init__(
        self, stack: Stack, clock: FakeClock, scopes: tuple[str, ...] = ("token:introspect",), **options: Any
    ) -> None:
        self.admin = stack.admin()
        # The MT5 API's own OAuth2 client: token:introspect lets it see other services' tokens.
        self.mt5 = self.admin.create_service("mt5-api-service", list(scopes))
        credentials = options.pop("credentials", None) or {
            "client_id": self.mt5["service_id"],
            "client_secret": self.mt5["client_secret"],
        }
        self.app, self.seen = protected_app(
            lambda app: PermisoAuth.introspection(
                app, url=options.pop("url", self.admin.url + INTROSPECT), clock=clock, **credentials, **options
            )
        )
        self.url = stack.serve(self.app).url

    def token(self, svc: dict[str, Any]) -> str:
        tc = TokenClient(self.admin.token_url, svc["service_id"], svc["client_secret"])
        try:
            return tc.get_token()
        finally:
            tc.close()

    def get(self, path: str, bearer: str, method: str = "GET") -> httpx.Response:
        with client_from(CALLER_ADDRESS) as http:
            return http.request(method, self.url + path, headers={"Authorization": f"Bearer {bearer}"})


def test_valid_tokens_and_keys_with_scopes_and_trust(stack: Stack, clock: FakeClock) -> None:
    env = Introspected(stack, clock, cache_ttl=10)
    dash = env.admin.create_service("trading-dashboard", ["trade:read", "account:read"])
    ops = env.admin.create_service("ops-console", ["admin:system"], is_trusted=True)
    token = env.token(dash)
    r = env.get("/api/v1/whoami", token)
    assert r.status_code == 200
    me = r.json()
    assert (me["service_id"], me["scopes"], me["trusted"], me["via"]) == (
        dash["service_id"], ["trade:read", "account:read"], False, "introspection",
    )  # fmt: skip
    assert me["token_id"]
    assert env.get("/api/v1/trades", token).status_code == 200
    r = env.get("/api/v1/trades", token, "POST")
    assert r.status_code == 403 and r.headers["www-authenticate"].endswith('scope="trade:open"')
    assert env.admin.requests_to(INTROSPECT) == 1  # three requests, one introspection
    assert env.get("/api/v1/admin/stats", env.token(ops)).status_code == 200
    # An API key is introspected too; a trusted service's key is trusted, as at the sidecar.
    r = env.get("/api/v1/trades", dash["api_key"])
    assert r.status_code == 200 and r.json()["caller"]["token_id"] is None
    assert env.get("/api/v1/admin/ping", ops["api_key"]).status_code == 200
    assert env.get("/api/v1/admin/ping", dash["api_key"]).status_code == 403
    for junk in ("svc_live_nope", "eyJ.eyJ.x"):
        r = env.get("/api/v1/whoami", junk)
        assert r.status_code == 401 and r.headers["www-authenticate"] == INVALID
    # Twenty concurrent requests with a new token: one introspection between them.
    fresh = env.token(dash)
    before = env.admin.requests_to(INTROSPECT)

    async def burst() -> list[int]:
        async with async_client_from(CALLER_ADDRESS, headers={"Authorization": f"Bearer {fresh}"}) as http:
            rs = await asyncio.gather(*(http.get(env.url + "/api/v1/whoami") for _ in range(20)))
        return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * 20
    assert env.admin.requests_to(INTROSPECT) == before + 1


def test_a_revoked_token_is_refused_within_the_cache_ttl(stack: Stack, clock: FakeClock) -> None:
    env = Introspected(stack, clock, cache_ttl=10)
    svc = env.admin.create_service("trading-dashboard", ["trade:read"])
    token = env.token(svc)
    assert env.get("/api/v1/whoami", token).status_code == 200  # introspected at t0, cached
    env.admin.revoke_token(token)
    clock.advance(9.9)
    # The cached answer is still used: this is the staleness cache_ttl allows.
    assert env.get("/api/v1/whoami", token).status_code == 200
    assert env.admin.requests_to(INTROSPECT) == 1
    clock.advance(0.1)  # the answer is now cache_ttl old: asked again, and refused
    r = env.get("/api/v1/whoami", token)
    assert r.status_code == 401 and r.headers["www-authenticate"] == INVALID
    assert env.get("/api/v1/whoami", token).status_code == 401  # the refusal is cached too
    assert env.admin.requests_to(INTROSPECT) == 2
    # The same for a revoked API key.
    env.admin.http.post(f"/auth/admin/services/{svc['service_id']}/keys/{svc['key_id']}/revoke").raise_for_status()
    clock.advance(10)
    assert env.get("/api/v1/whoami", svc["api_key"]).status_code == 401
    # cache_ttl=0: every request asks.
    fresh = Introspected(stack, clock, cache_ttl=0)
    other = fresh.admin.create_service("dashboard", ["trade:read"])
    token = fresh.token(other)
    assert fresh.get("/api/v1/whoami", token).status_code == 200
    fresh.admin.revoke_token(token)
    assert fresh.get("/api/v1/whoami", token).status_code == 401


def test_a_cached_answer_never_outlives_the_tokens_exp(stack: Stack, clock: FakeClock) -> None:
    env = Introspected(stack, clock, cache_ttl=3600)
    svc = env.admin.create_service("short-lived", ["trade:read"], access_token_lifetime=60)
    token = env.token(svc)
    assert env.get("/api/v1/whoami", token).status_code == 200
    clock.advance(61)
    assert env.get("/api/v1/whoami", token).status_code == 401
    assert env.admin.requests_to(INTROSPECT) == 1


def test_the_introspecting_service_needs_token_introspect(stack: Stack, clock: FakeClock) -> None:
    # Without the scope Permiso answers {"active": false} for other services' tokens.
    env = Introspected(stack, clock, scopes=("market:data",))
    svc = env.admin.create_service("dashboard", ["trade:read"])
    assert env.get("/api/v1/whoami", env.token(svc)).status_code == 401
    # Other credentials: a service key holding token:introspect, or the admin key.
    holder = env.admin.create_service("introspector", ["token:introspect"])
    token = env.token(svc)
    credentials: dict[str, str]
    for credentials in ({"api_key": holder["api_key"]}, {"admin_key": env.admin.key}):

        def make(app: Any, c: dict[str, str] = credentials) -> PermisoAuth:
            return PermisoAuth.introspection(app, url=env.admin.url + INTROSPECT, clock=clock, **c)

        app, _ = protected_app(make)
        server = stack.serve(app)
        r = httpx.get(server.url + "/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["service_id"] == svc["service_id"]


def test_introspection_unavailable_fails_closed_with_503(stack: Stack, clock: FakeClock) -> None:
    down = Introspected(stack, clock, url=f"http://127.0.0.1:{free_port()}{INTROSPECT}")
    svc = down.admin.create_service("dashboard", ["trade:read"])
    r = down.get("/api/v1/whoami", down.token(svc))
    assert r.status_code == 503 and r.json()["error"] == "temporarily_unavailable"
    wrong = Introspected(
        stack, clock, credentials={"client_id": "srv_AAAAAAAAAAAAAAAAAAAAAA", "client_secret": "pcs_x"}
    )
    svc = wrong.admin.create_service("dashboard", ["trade:read"])
    r = wrong.get("/api/v1/whoami", wrong.token(svc))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"


def test_invented_tokens_cannot_push_real_answers_out_of_the_cache(stack: Stack, clock: FakeClock) -> None:
    env = Introspected(stack, clock, cache_ttl=60, cache_size=4, negative_cache_size=2)
    svc = env.admin.create_service("trading-dashboard", ["trade:read"])
    token = env.token(svc)
    assert env.get("/api/v1/whoami", token).status_code == 200
    # Well-shaped but unknown keys: each asked once (the admin plane's answer is the only
    # way to know), their refusals kept apart in the small negative cache.
    invented = [f"svc_live_{i:049d}" for i in range(10)]
    for junk in invented:
        assert env.get("/api/v1/whoami", junk).status_code == 401
    assert env.admin.requests_to(INTROSPECT) == 11
    assert env.get("/api/v1/whoami", token).status_code == 200
    assert env.get("/api/v1/whoami", invented[-1]).status_code == 401  # still cached
    assert env.admin.requests_to(INTROSPECT) == 11  # the real answer was never pushed out
    # Ill-shaped ones never leave the process; nor do JWTs that fail against the published
    # keys: an invented kid, a real token with its payload or signature changed.
    h, p, sig = token.split(".")
    forged = [
        "eyJhbGciOiJFZERTQSIsInR5cCI6ImF0K2p3dCIsImtpZCI6Im5vcGUifQ.e30.c2ln",
        f"{h}.{p[:10]}{'B' if p[10] == 'A' else 'A'}{p[11:]}.{sig}",
        f"{h}.{p}.{'B' if sig[0] == 'A' else 'A'}{sig[1:]}",
    ]
    for junk in ["nope", "svc_live_short", "eyJ.only-two", "x" * 100, *forged]:
        r = env.get("/api/v1/whoami", junk)
        assert r.status_code == 401 and r.headers["www-authenticate"] == INVALID, junk
    assert env.admin.requests_to(INTROSPECT) == 11


def test_trust_or_a_scope_taken_from_the_service_ends_at_the_next_introspection(stack: Stack, clock: FakeClock) -> None:
    env = Introspected(stack, clock, cache_ttl=10)
    ops = env.admin.create_service("ops-console", ["admin:system", "trade:read", "account:read"], is_trusted=True)
    token = env.token(ops)
    assert env.get("/api/v1/admin/stats", token).status_code == 200
    assert env.get("/api/v1/trades", token).status_code == 200
    env.admin.http.patch(
        f"/auth/admin/services/{ops['service_id']}", json={"is_trusted": False, "scopes": ["trade:read"]}
    ).raise_for_status()
    clock.advance(10)
    r = env.get("/api/v1/admin/stats", token)
    assert r.status_code == 403 and r.json()["error"] == "access_denied"
    r = env.get("/api/v1/trades", token)
    assert r.status_code == 403 and r.headers["www-authenticate"].endswith('scope="trade:read account:read"')
    assert env.get("/api/v1/whoami", token).json()["scopes"] == ["trade:read"]
