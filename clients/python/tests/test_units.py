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
