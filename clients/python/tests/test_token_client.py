"""TokenClient / AsyncTokenClient / TokenAuth against a real admin plane and a real sidecar."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import CALLER_ADDRESS, FakeClock, Stack, async_client_from, client_from, wait_until

from permiso import AsyncTokenClient, TokenAuth, TokenClient, TokenError
from permiso.client import AuthMethod, _retry_after

DASHBOARD_SCOPES = ["mt5:call", "trade:read", "account:read", "market:data"]


class Recording(httpx.BaseTransport):
    """Wraps the real transport of the token client, to see what went on the wire."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[httpx.Request] = []
        self.responses: list[tuple[int, httpx.Headers]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.inner.handle_request(request)
        self.responses.append((response.status_code, response.headers))
        return response

    def close(self) -> None:
        self.inner.close()


def claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


def test_one_token_for_50_concurrent_calls(stack: Stack) -> None:
    admin, _, sidecar, seen = stack.behind_sidecar()
    svc = admin.create_service("trading-dashboard", DASHBOARD_SCOPES)
    sidecar.wait_accepts(svc["api_key"])
    tc = TokenClient(admin.token_url, svc["service_id"], svc["client_secret"])
    barrier = threading.Barrier(50)

    with client_from(CALLER_ADDRESS, auth=tc.auth) as http:

        def call(_: int) -> int:
            barrier.wait()
            return http.get(f"{sidecar.url}/api/v1/trades").status_code

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(call, range(50)))
    assert statuses == [200] * 50
    assert seen.count("trades") == 50
    assert admin.tokens_issued() == 1
    tc.close()


def test_one_token_for_50_concurrent_async_calls(stack: Stack) -> None:
    admin, _, sidecar, seen = stack.behind_sidecar()
    svc = admin.create_service("trading-dashboard", DASHBOARD_SCOPES)
    sidecar.wait_accepts(svc["api_key"])

    async def main() -> tuple[list[int], list[int]]:
        async with AsyncTokenClient(admin.token_url, svc["service_id"], svc["client_secret"]) as tc:
            async with async_client_from(CALLER_ADDRESS, auth=tc.auth) as http:
                first = await asyncio.gather(*(http.get(f"{sidecar.url}/api/v1/trades") for _ in range(50)))
        # A sync TokenClient in an async httpx client: its fetch runs in a worker thread.
        sync_tc = TokenClient(admin.token_url, svc["service_id"], svc["client_secret"])
        async with async_client_from(CALLER_ADDRESS, auth=TokenAuth(sync_tc)) as http:
            second = await asyncio.gather(*(http.get(f"{sidecar.url}/api/v1/trades") for _ in range(20)))
        sync_tc.close()
        return [r.status_code for r in first], [r.status_code for r in second]

    first, second = asyncio.run(main())
    assert first == [200] * 50 and second == [200] * 20
    assert seen.count("trades") == 70
    assert admin.tokens_issued() == 2  # one per client


def test_refreshed_before_expiry_on_the_injected_clock(stack: Stack, clock: FakeClock) -> None:
    admin, _, sidecar, _ = stack.behind_sidecar()
    svc = admin.create_service("short-lived", DASHBOARD_SCOPES, access_token_lifetime=60)
    sidecar.wait_accepts(svc["api_key"])
    tc = TokenClient(admin.token_url, svc["service_id"], svc["client_secret"], clock=clock, refresh_margin=30)
    a = tc.token()
    assert a.expires_in == 60 and a.expires_at == clock.now + 60
    clock.advance(29.9)  # before exp - margin: cached
    assert tc.get_token() == a.access_token
    assert admin.tokens_issued() == 1
    clock.advance(0.2)  # past exp - margin
    b = tc.get_token()
    assert b != a.access_token and admin.tokens_issued() == 2
    clock.advance(120)  # long past expiry
    c = tc.get_token()
    assert c not in (a.access_token, b) and admin.tokens_issued() == 3
    with client_from(CALLER_ADDRESS, auth=tc.auth) as http:
        assert http.get(f"{sidecar.url}/api/v1/whoami").json()["token_id"] == claims(c)["jti"]
    assert admin.tokens_issued() == 3
    tc.close()


def test_a_revoked_token_is_replaced_after_the_resources_401(stack: Stack) -> None:
    admin, _, sidecar, seen = stack.behind_sidecar()
    svc = admin.create_service("trading-dashboard", DASHBOARD_SCOPES)
    sidecar.wait_accepts(svc["api_key"])
    tc = TokenClient(admin.token_url, svc["service_id"], svc["client_secret"])
    with client_from(CALLER_ADDRESS, auth=tc.auth) as http:
        r = http.get(f"{sidecar.url}/api/v1/whoami")
        assert r.status_code == 200 and not r.history
        old = tc.get_token()
        assert r.json()["token_id"] == claims(old)["jti"]
        # The client revokes its own token (RFC 7009), authenticating with its secret.
        revoked = httpx.post(
            f"{admin.url}/oauth/revoke", data={"token": old}, auth=(svc["service_id"], svc["client_secret"])
        )
        assert revoked.status_code == 200
        wait_until(
            lambda: (
                httpx.get(f"{sidecar.url}/api/v1/whoami", headers={"Authorization": f"Bearer {old}"}).status_code == 401
            ),
            what="the revocation to reach the sidecar",
        )
        r = http.get(f"{sidecar.url}/api/v1/whoami")
        assert r.status_code == 200
        assert [h.status_code for h in r.history] == [401]
        assert 'error="invalid_token"' in r.history[0].headers["www-authenticate"]
        new = tc.get_token()
        assert new != old and r.json()["token_id"] == claims(new)["jti"]
        # A request with a body is resent whole.
        r = http.post(f"{sidecar.url}/api/v1/trades", json={"symbol": "EURUSD"})
        assert r.status_code == 403  # the app's own scope check: the token lacks trade:open
    assert admin.tokens_issued() == 2
    assert seen.count("whoami") == 3  # wait_accepts, then one per call: the 401 never reached the app
    tc.close()


def test_a_revoked_token_is_replaced_after_the_resources_401_async(stack: Stack) -> None:
    admin, _, sidecar, _ = stack.behind_sidecar()
    svc = admin.create_service("trading-dashboard", DASHBOARD_SCOPES)
    sidecar.wait_accepts(svc["api_key"])

    async def main() -> None:
        async with AsyncTokenClient(admin.token_url, svc["service_id"], svc["client_secret"]) as tc:
            async with async_client_from(CALLER_ADDRESS, auth=tc.auth) as http:
                assert (await http.get(f"{sidecar.url}/api/v1/whoami")).status_code == 200
                old = await tc.get_token()
                admin.revoke_token(old)  # with the admin key this time
                async with httpx.AsyncClient() as raw:
                    for _ in range(500):
                        r = await raw.get(f"{sidecar.url}/api/v1/whoami", headers={"Authorization": f"Bearer {old}"})
                        if r.status_code == 401:
                            break
                        await asyncio.sleep(0.02)
                # Ten concurrent calls all meet the 401: one refresh serves them all.
                rs = await asyncio.gather(*(http.get(f"{sidecar.url}/api/v1/whoami") for _ in range(10)))
                assert [r.status_code for r in rs] == [200] * 10
                assert all([h.status_code for h in r.history] == [401] for r in rs)
                assert await tc.get_token() != old

    asyncio.run(main())
    assert admin.tokens_issued() == 2


def test_retry_after_is_obeyed_on_429(stack: Stack) -> None:
    # 60 token requests a minute per address: a burst of 60, then one more per second.
    admin = stack.admin(token_requests_per_minute_per_ip=60)
    svc = admin.create_service("trading-dashboard", ["trade:read"])
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)  # really wait what the server asked: the retry must then pass

    for rounds in range(1, 4):  # noqa: B007 (read after the loop)
        with httpx.Client() as raw:
            for _ in range(200):  # spend this address's budget (every request counts)
                if raw.post(admin.token_url, data={"grant_type": "none"}).status_code == 429:
                    break
            else:
                pytest.fail("the token endpoint never answered 429")
        slept.clear()
        wire = Recording()
        tc = TokenClient(
            admin.token_url,
            svc["service_id"],
            svc["client_secret"],
            sleep=sleep,
            http_client=httpx.Client(transport=wire),
        )
        token = tc.get_token()
        if wire.responses[0][0] == 429:
            break
        # Rare: the next request slot came between the last refusal and this request.
    else:
        pytest.fail("never got a 429 on the token client's first request")
    assert [s for s, _ in wire.responses] == [429, 200]
    told = wire.responses[0][1]["retry-after"]
    assert slept == [float(told)] and 1 <= float(told) <= 2
    assert claims(token)["sub"] == svc["service_id"]
    assert admin.tokens_issued() == rounds


def test_exponential_backoff_with_jitter_while_the_token_endpoint_is_down(stack: Stack) -> None:
    admin = stack.admin()
    svc = admin.create_service("trading-dashboard", ["trade:read"])
    admin.stop()
    slept: list[float] = []

    # Bounded: gives up after max_attempts with the last error.
    tc = TokenClient(
        admin.token_url, svc["service_id"], svc["client_secret"],
        max_attempts=4, backoff_base=0.5, sleep=slept.append, random=lambda: 0.0,
    )  # fmt: skip
    with pytest.raises(TokenError, match="unreachable"):
        tc.get_token()
    assert slept == [0.25, 0.5, 1.0]  # half of 0.5 * 2^n with the jitter at 0

    # The endpoint comes back during the back-off: the next attempt gets the token.
    slept.clear()

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 2:
            admin.start()

    tc = TokenClient(
        admin.token_url, svc["service_id"], svc["client_secret"],
        backoff_base=0.5, backoff_max=0.8, sleep=sleep, random=lambda: 1.0,
    )  # fmt: skip
    assert claims(tc.get_token())["sub"] == svc["service_id"]
    assert slept == [0.5, 0.8]  # the whole 0.5 * 2^n, capped at backoff_max


def test_errors_that_retrying_cannot_fix_are_raised_at_once(stack: Stack) -> None:
    admin = stack.admin()
    svc = admin.create_service("trading-dashboard", ["trade:read"])
    slept: list[float] = []
    bad = TokenClient(admin.token_url, svc["service_id"], "pcs_wrong", sleep=slept.append)
    with pytest.raises(TokenError) as e:
        bad.get_token()
    assert (e.value.status_code, e.value.error) == (401, "invalid_client")
    scope = TokenClient(
        admin.token_url, svc["service_id"], svc["client_secret"], scope="trade:open", sleep=slept.append
    )
    with pytest.raises(TokenError) as e:
        scope.get_token()
    assert (e.value.status_code, e.value.error) == (400, "invalid_scope")
    assert slept == []


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_both_client_authentication_methods(stack: Stack, method: AuthMethod) -> None:
    admin, _, sidecar, _ = stack.behind_sidecar()
    svc = admin.create_service("trading-dashboard", DASHBOARD_SCOPES)
    sidecar.wait_accepts(svc["api_key"])
    wire = Recording()
    tc = TokenClient(
        admin.token_url, svc["service_id"], svc["client_secret"],
        scope=["mt5:call", "trade:read"], auth_method=method, http_client=httpx.Client(transport=wire),
    )  # fmt: skip
    tok = tc.token()
    assert tok.scope == "mt5:call trade:read"
    sent = wire.requests[0]
    form = dict(httpx.QueryParams(sent.content.decode()))
    if method == "client_secret_basic":
        assert sent.headers["authorization"].startswith("Basic ")
        assert "client_secret" not in form
    else:
        assert "authorization" not in sent.headers
        assert form["client_id"] == svc["service_id"] and form["client_secret"] == svc["client_secret"]
    assert form["grant_type"] == "client_credentials" and form["scope"] == "mt5:call trade:read"
    with client_from(CALLER_ADDRESS, auth=tc.auth) as http:
        me = http.get(f"{sidecar.url}/api/v1/whoami").json()
    assert me["service_id"] == svc["service_id"] and me["scopes"] == ["mt5:call", "trade:read"]


def test_a_failed_refresh_is_shared_by_the_callers_waiting_for_it(stack: Stack) -> None:
    admin = stack.admin()
    svc = admin.create_service("trading-dashboard", ["trade:read"])
    wire = Recording()
    # Wrong secret: 401 invalid_client, never retried. (Past 10 failures a minute from one
    # address the admin plane answers 429; max_attempts=1 keeps the test from waiting on it.)
    tc = TokenClient(
        admin.token_url, svc["service_id"], "pcs_wrong", max_attempts=1, http_client=httpx.Client(transport=wire)
    )
    barrier = threading.Barrier(20)

    def call(_: int) -> str:
        barrier.wait()
        try:
            tc.get_token()
            return "token"
        except TokenError as e:
            return str(e.error)

    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(call, range(20)))
    assert "token" not in outcomes and "invalid_client" in outcomes
    assert set(outcomes) <= {"invalid_client", "rate_limited"}
    # Far fewer requests than callers: those that waited took the failure they waited for.
    assert len(wire.requests) < 20


def test_retry_after_forms() -> None:
    assert _retry_after("7", 0) == 7
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470) == 10
    assert _retry_after("garbage", 0) is None and _retry_after(None, 0) is None


def test_mtls_client_certificate(stack: Stack, tmp_path: Any) -> None:
    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki", client_identity="spiffe://permiso/trading-dashboard")
    admin = stack.admin(tls=pki)  # HTTPS, client certificates optional
    svc = admin.create_service(
        "trading-dashboard", ["trade:read"], tls_identities=["spiffe://permiso/trading-dashboard"]
    )
    cert = (str(pki.client_cert), str(pki.client_key))
    # The certificate alone authenticates the client (RFC 8705 tls_client_auth) ...
    by_cert = TokenClient(
        admin.token_url, svc["service_id"], None, auth_method="tls_client_auth", cert=cert, verify=str(pki.ca)
    )
    # ... or it rides along with the secret; either way the token is bound to it (cnf).
    with_secret = TokenClient(admin.token_url, svc["service_id"], svc["client_secret"], cert=cert, verify=str(pki.ca))
    plain = TokenClient(admin.token_url, svc["service_id"], svc["client_secret"], verify=str(pki.ca))
    bound = [claims(c.get_token()).get("cnf") for c in (by_cert, with_secret)]
    assert bound[0] is not None and bound[0] == bound[1] and set(bound[0]) == {"x5t#S256"}
    assert "cnf" not in claims(plain.get_token())
    no_cert = TokenClient(admin.token_url, svc["service_id"], None, auth_method="tls_client_auth", verify=str(pki.ca))
    with pytest.raises(TokenError) as e:
        no_cert.get_token()
    assert e.value.error == "invalid_client"


def test_a_resource_refusing_every_token_does_not_turn_each_call_into_a_fetch(stack: Stack) -> None:
    from conftest import protected_app

    from permiso.fastapi import PermisoAuth

    admin = stack.admin()
    svc = admin.create_service("trading-dashboard", DASHBOARD_SCOPES)
    # A resource that wants another audience: every Permiso token is a 401 there.
    app, seen = protected_app(lambda app: PermisoAuth.jwt(app, issuer=admin.url, audience="someone-else"))
    server = stack.serve(app)
    clock = FakeClock()
    tc = TokenClient(admin.token_url, svc["service_id"], svc["client_secret"], clock=clock)
    with client_from(CALLER_ADDRESS, auth=tc.auth) as http:
        first = http.get(f"{server.url}/api/v1/whoami")
        assert first.status_code == 401 and [h.status_code for h in first.history] == [401]
        for _ in range(20):
            r = http.get(f"{server.url}/api/v1/whoami")
            assert r.status_code == 401 and not r.history  # returned as is: no fetch, no resend
        assert admin.tokens_issued() == 2
        clock.advance(5)  # retry_401_interval later, one more fresh token is worth a try
        r = http.get(f"{server.url}/api/v1/whoami")
        assert [h.status_code for h in r.history] == [401]
    assert admin.tokens_issued() == 3 and tc.fetches == 3 and not seen
    tc.close()
