"""The pure parts: scope matching (the Rust core's own cases), the Authorization header, the
sidecar address check and the refusal answers."""

from __future__ import annotations

import pytest

from permiso import Caller, Denial
from permiso.scopes import allows, grants, missing, validate
from permiso.verify import SidecarGate, bearer_token


def test_scope_syntax_as_the_core() -> None:
    for ok in ["read", "trade:open", "admin:*", "a.b-c_d:E1", "trade:x:*", "x:y:z"]:
        assert validate(ok) == ok
    for bad in ["", "*", "trade:", ":open", "a::b", "trade:*:x", "tra de", "trade:o*", "ü:x", "a:**", "a" * 129]:
        with pytest.raises(ValueError):
            validate(bad)


def test_scope_matching_as_the_core() -> None:
    held = ["trade:*", "account:read"]
    assert allows(held, "trade:open") and allows(held, "trade:close:all") and allows(held, "trade:*")
    assert not allows(held, "trade") and not allows(held, "trades:open")
    assert allows(held, "account:read") and not allows(held, "account:balance") and not allows(held, "Account:read")
    assert not grants("trade:*", "trade:") and not grants("trade:*", "trade")
    assert grants("admin:*", "admin:system") and grants("admin:*", "admin:*") and not grants("admin:system", "admin:*")
    assert missing(["a:x", "b:*"], ["a:x", "b:y", "c:y"]) == ["c:y"]
    caller = Caller(service_id="srv_a", scopes=("b:*",))
    assert caller.has_scope("b:q") and caller.missing_scopes("b:q", "a:x") == ["a:x"] and caller.client_id == "srv_a"


def test_authorization_header_as_the_sidecar_reads_it() -> None:
    assert bearer_token(["Bearer abc"]) == "abc"
    assert bearer_token(["bearer  abc "]) == "abc"
    for values, status, error in [
        ([], 401, "unauthorized"),
        (["Basic YTpi"], 401, "unauthorized"),
        (["abc"], 401, "unauthorized"),
        (["Bearer "], 401, "invalid_token"),
        (["Bearer a", "Bearer b"], 400, "invalid_request"),
    ]:
        with pytest.raises(Denial) as e:
            bearer_token(values)
        assert (e.value.status, e.value.error) == (status, error), values


def test_sidecar_addresses() -> None:
    gate = SidecarGate(["127.0.0.1/32", "10.1.0.0/16", "::1"])
    for peer in ["127.0.0.1", "10.1.2.3", "::1", "::ffff:127.0.0.1"]:
        assert gate.trusts(peer), peer
    untrusted: list[str | None] = ["127.0.0.2", "10.2.0.1", "::2", "", None, "testclient", "fe80::1%eth0"]
    for other in untrusted:
        assert not gate.trusts(other), other
    headers = {"x-permiso-service-id": "srv_a", "x-permiso-scopes": "a:b c:*", "x-permiso-trusted": "true"}
    caller = gate.caller("127.0.0.1", headers)
    assert (caller.service_id, caller.scopes, caller.trusted, caller.via) == ("srv_a", ("a:b", "c:*"), True, "sidecar")
    with pytest.raises(Denial) as e:
        gate.caller("127.0.0.2", headers)
    assert e.value.status == 401 and e.value.reason == "not_from_sidecar"
    with pytest.raises(Denial):
        gate.caller("127.0.0.1", {})  # from the sidecar, but forwarded without identity
    with pytest.raises(ValueError):
        SidecarGate([])


def test_refusals_are_the_sidecars_answers() -> None:
    # crates/core/src/denial.rs
    d = Denial.missing_credential()
    assert (d.status, d.headers, d.body_bytes()) == (
        401,
        {"WWW-Authenticate": 'Bearer realm="permiso"'},
        b'{"error":"unauthorized","error_description":"A Bearer credential is required"}',
    )
    d = Denial.invalid_token("jwt_expired")
    assert d.headers["WWW-Authenticate"] == (
        'Bearer realm="permiso", error="invalid_token", '
        'error_description="The access token is invalid, expired or revoked"'
    )
    assert d.body == {"error": "invalid_token", "error_description": "The access token is invalid, expired or revoked"}
    d = Denial.insufficient_scope("trade:read account:read")
    assert d.status == 403
    assert (
        d.headers["WWW-Authenticate"]
        == 'Bearer realm="permiso", error="insufficient_scope", scope="trade:read account:read"'
    )
    assert d.body["error_description"] == "This route requires the scope(s): trade:read account:read"
    d = Denial.not_trusted()
    assert (d.status, d.headers, d.body["error"]) == (403, {}, "access_denied")
    assert d.response_headers()["Cache-Control"] == "no-store"


def test_trusted_proxies_must_be_exact_and_narrow() -> None:
    for bad in ["127.0.0.5/8", "10.0.0.0/4", "0.0.0.0/0", "::/0", "2001:db8::/16", "not-an-ip", "::ffff:0:0/96"]:
        with pytest.raises(ValueError):
            SidecarGate([bad])
    assert SidecarGate(["0.0.0.0/4"], allow_wide=True).trusts("10.9.9.9")
    # An IPv4-mapped entry means the IPv4 address, whichever form the peer arrives in.
    gate = SidecarGate(["::ffff:10.1.2.3"])
    assert gate.trusts("10.1.2.3") and gate.trusts("::ffff:10.1.2.3") and not gate.trusts("10.1.2.4")


def test_forwarded_allow_ips_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    with pytest.raises(ValueError, match="FORWARDED_ALLOW_IPS"):
        SidecarGate()
    SidecarGate(allow_forwarded_ips=True)
    monkeypatch.delenv("FORWARDED_ALLOW_IPS")
    monkeypatch.setenv("UVICORN_FORWARDED_ALLOW_IPS", "*")  # uvicorn's own env prefix
    with pytest.raises(ValueError, match="UVICORN_FORWARDED_ALLOW_IPS"):
        SidecarGate()
    monkeypatch.delenv("UVICORN_FORWARDED_ALLOW_IPS")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "-k uvicorn.workers.UvicornWorker --forwarded-allow-ips=*")
    with pytest.raises(ValueError, match="GUNICORN_CMD_ARGS"):
        SidecarGate()
    monkeypatch.delenv("GUNICORN_CMD_ARGS")
    monkeypatch.setattr("sys.argv", ["uvicorn", "app:app", "--forwarded-allow-ips=*"])
    with pytest.raises(ValueError, match="--forwarded-allow-ips"):
        SidecarGate()


def test_identity_headers_are_judged_as_the_sidecar_writes_them() -> None:
    from starlette.datastructures import Headers

    gate = SidecarGate()

    def raw(*pairs: tuple[str, str]) -> Headers:
        # ASGI servers hand header names over lower-cased.
        return Headers(raw=[(k.lower().encode(), v.encode()) for k, v in pairs])

    base = [("x-permiso-service-id", "srv_a"), ("x-permiso-scopes", "a:b c:*"), ("x-permiso-trusted", "false")]
    assert gate.caller("127.0.0.1", raw(*base)).scopes == ("a:b", "c:*")
    for extra in [
        ("X-Permiso-Scopes", "admin:*"),  # appended to the sidecar's own
        ("x-permiso-trusted", "true"),
        ("X-PERMISO-SERVICE-ID", "srv_b"),
    ]:
        with pytest.raises(Denial) as e:
            gate.caller("127.0.0.1", raw(*base, extra))
        assert (e.value.status, e.value.reason) == (401, "duplicate_identity_header"), extra
    for name, value in [
        ("x-permiso-trusted", "True"),
        ("x-permiso-trusted", "1"),
        ("x-permiso-trusted", "true "),
        ("x-permiso-scopes", "a:b  c:d"),
        ("x-permiso-scopes", "a:b\tc:d"),
        ("x-permiso-scopes", "a:*:b"),
    ]:
        headers = [(k, v) for k, v in base if k != name] + [(name, value)]
        with pytest.raises(Denial) as e:
            gate.caller("127.0.0.1", raw(*headers))
        assert (e.value.status, e.value.reason) == (401, "malformed_identity_header"), (name, value)


def test_only_permiso_shaped_credentials_are_worth_introspecting() -> None:
    from permiso.verify import looks_like_permiso_credential

    key = "svc_live_" + "A" * 43 + "abc-_9"
    assert looks_like_permiso_credential(key) and looks_like_permiso_credential(key.replace("live", "test"))
    assert looks_like_permiso_credential("eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln")
    for bad in [
        key[:-1],
        key + "A",
        key.replace("live", "prod"),
        key[:-1] + "=",
        "eyJ.a",
        "eyJa.b.c.d",
        "eyJa.b.c=",
        "x" * 20,
        "eyJ" + "a" * 9000 + ".b.c",
        "svc_live_" + "é" * 49,
    ]:
        assert not looks_like_permiso_credential(bad), bad


def test_retry_after_and_token_answers_are_read_strictly() -> None:
    import httpx

    from permiso.client import TokenError, _Config, _retry_after

    now = 1_000_000_000.0
    assert _retry_after("5", now) == 5.0 and _retry_after(" 12 ", now) == 12.0
    for bad in ["-1", "1.5", "+3", "１２", "99999999999", "", None, "soon"]:
        assert _retry_after(bad, now) is None, bad
    # An HTTP date is GMT even when the zone is missing or "-0000".
    assert _retry_after("Sun, 09 Sep 2001 01:48:00 GMT", now) == 80.0
    assert _retry_after("Sun, 09 Sep 2001 01:48:00 -0000", now) == 80.0
    cfg = _Config("http://x/oauth/token", "srv_a", "pcs_x", None, "client_secret_basic", 30, 1, 0.5, 30, 120, 5,
                  lambda: now, lambda: 0.5)  # fmt: skip
    ok = {"access_token": "t", "token_type": "Bearer"}
    assert cfg.read(httpx.Response(200, json={**ok, "expires_in": 300}), now).expires_at == now + 300
    for exp in [0, -5, "nan", "inf", 86400 * 367, 1e308]:
        with pytest.raises(TokenError):
            cfg.read(httpx.Response(200, json={**ok, "expires_in": exp}), now)
    with pytest.raises(TokenError):
        cfg.read(httpx.Response(200, json={**ok, "access_token": ""}), now)


def test_introspection_sends_nothing_for_invented_tokens_and_caps_what_is_in_flight() -> None:
    import asyncio
    import socket

    from permiso.verify import Introspector

    # A server that accepts and never answers: every introspection stays in flight.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/oauth/introspect"
        intro = Introspector(url, api_key="svc_live_" + "k" * 49, max_inflight=2, timeout=30)
        key = "svc_live_" + "A" * 43 + "abcdef"

        async def run() -> list[tuple[int, str]]:
            outcomes = []
            for bad in ["x" * 40, "Bearer", key[:-1], "eyJ" + "a" * 9000 + ".b.c"]:
                with pytest.raises(Denial) as e:
                    await intro.verify(bad)
                outcomes.append((e.value.status, e.value.reason))
            first = [asyncio.ensure_future(intro.verify(key[:-1] + c)) for c in "xy"]
            await asyncio.sleep(0)  # both now wait on the silent server
            with pytest.raises(Denial) as e:
                await intro.verify(key[:-1] + "z")
            outcomes.append((e.value.status, e.value.reason))
            for t in first:
                t.cancel()
            await asyncio.gather(*first, return_exceptions=True)
            await intro.aclose()
            return outcomes

        outcomes = asyncio.run(run())
    assert outcomes[:4] == [(401, "not_a_permiso_credential")] * 4
    assert outcomes[4] == (503, "introspection_busy")
    assert intro.requests == 2  # the two in flight; nothing for the invented or the refused


def test_non_ascii_authorization_is_a_bad_request_as_at_the_sidecar() -> None:
    # Starlette hands header bytes over as latin-1 text.
    for value in ["Bearer caf\u00e9", "B\u00e9arer x", "Bearer x\u0080"]:
        with pytest.raises(Denial) as e:
            bearer_token([value])
        assert (e.value.status, e.value.reason) == (400, "authorization_not_ascii"), value


def test_a_jwt_lacking_an_rfc_9068_claim_is_refused() -> None:
    from permiso.verify import JwtVerifier

    v = JwtVerifier("http://as", "permiso", clock=lambda: 1000.0)
    full = {"iss": "http://as", "aud": "permiso", "exp": 1300, "iat": 1000, "nbf": 1000, "jti": "tok_1",
            "sub": "srv_a", "client_id": "srv_a", "scope": "a:b"}  # fmt: skip
    caller = v._caller(full)
    assert caller.token_id == "tok_1" and caller.claims == full
    for claim in ["exp", "iat", "nbf", "jti", "sub", "client_id", "scope", "iss", "aud"]:
        with pytest.raises(Denial) as e:
            v._caller({k: x for k, x in full.items() if k != claim})
        assert e.value.status == 401, claim
    for claim, bad in [("jti", 5), ("sub", ""), ("iat", "1000"), ("scope", None), ("exp", True)]:
        with pytest.raises(Denial):
            v._caller({**full, claim: bad})
