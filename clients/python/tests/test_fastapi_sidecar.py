"""permiso.fastapi behind a real `permiso sidecar`: the caller from the X-Permiso-* headers,
scopes and trust enforced by the app with the sidecar's own answers, and forged headers from
anywhere but the sidecar refused."""

from __future__ import annotations

import json

import httpx
from conftest import CALLER_ADDRESS, FORGER_ADDRESS, Stack, client_from, protected_app

from permiso import TokenClient
from permiso.fastapi import PermisoAuth

REALM = 'Bearer realm="permiso"'


def body(r: httpx.Response) -> dict[str, str]:
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    return dict(json.loads(r.content))


def test_allowed_with_an_api_key_and_with_a_token(stack: Stack) -> None:
    admin, _, sidecar, seen = stack.behind_sidecar()
    svc = admin.create_service("trading-dashboard", ["mt5:call", "trade:read", "account:read"])
    sidecar.wait_accepts(svc["api_key"])
    with client_from(CALLER_ADDRESS, headers={"Authorization": f"Bearer {svc['api_key']}"}) as http:
        r = http.get(f"{sidecar.url}/api/v1/trades")
    assert r.status_code == 200
    assert r.json()["caller"] == {
        "service_id": svc["service_id"],
        "service_name": "trading-dashboard",
        "scopes": ["mt5:call", "trade:read", "account:read"],
        "key_id": svc["key_id"],
        "token_id": None,
        "environment": "live",
        "trusted": False,
        "client_cert_identity": None,
        "via": "sidecar",
    }
    tc = TokenClient(admin.token_url, svc["service_id"], svc["client_secret"], scope="mt5:call trade:read account:read")
    with client_from(CALLER_ADDRESS, auth=tc.auth) as http:
        caller = http.get(f"{sidecar.url}/api/v1/trades").json()["caller"]
    assert caller["token_id"] and caller["key_id"] is None
    assert caller["service_id"] == svc["service_id"] and caller["service_name"] == "trading-dashboard"
    assert seen.count("trades") == 2
    tc.close()


def test_403_names_the_scope_exactly_as_the_sidecar_does(stack: Stack) -> None:
    admin, _, sidecar, seen = stack.behind_sidecar()
    reader = admin.create_service("reader", ["mt5:call", "trade:read"])
    outsider = admin.create_service("outsider", ["trade:read", "account:read"])
    sidecar.wait_accepts(reader["api_key"])
    with client_from(CALLER_ADDRESS) as http:
        as_reader = {"Authorization": f"Bearer {reader['api_key']}"}
        # The app refuses: the sidecar's route (mt5:call) let it through.
        r = http.post(f"{sidecar.url}/api/v1/trades", headers=as_reader)
        assert r.status_code == 403
        assert r.headers["www-authenticate"] == f'{REALM}, error="insufficient_scope", scope="trade:open"'
        assert body(r) == {
            "error": "insufficient_scope",
            "error_description": "This route requires the scope(s): trade:open",
        }
        assert r.headers.get("server") == "uvicorn"  # answered by the app, through the sidecar
        # A route needing two scopes names both, as the sidecar's scope attribute does.
        r = http.get(f"{sidecar.url}/api/v1/trades", headers=as_reader)
        assert r.headers["www-authenticate"] == f'{REALM}, error="insufficient_scope", scope="trade:read account:read"'
        # The sidecar's own refusal of a caller without its route's scope: the same answer.
        s = http.get(f"{sidecar.url}/api/v1/trades", headers={"Authorization": f"Bearer {outsider['api_key']}"})
        assert s.status_code == 403 and "server" not in s.headers
        assert s.headers["www-authenticate"] == f'{REALM}, error="insufficient_scope", scope="mt5:call"'
        assert body(s) == {
            "error": "insufficient_scope",
            "error_description": "This route requires the scope(s): mt5:call",
        }
    assert "open" not in seen and "trades" not in seen


def test_wildcards_as_the_sidecar(stack: Stack) -> None:
    admin, _, sidecar, _ = stack.behind_sidecar()
    svc = admin.create_service("trader", ["mt5:*", "trade:*", "account:read"])
    sidecar.wait_accepts(svc["api_key"])
    with client_from(CALLER_ADDRESS, headers={"Authorization": f"Bearer {svc['api_key']}"}) as http:
        assert http.post(f"{sidecar.url}/api/v1/trades").status_code == 200
        assert http.get(f"{sidecar.url}/api/v1/trades").status_code == 200


def test_trusted_only_routes(stack: Stack) -> None:
    admin, _, sidecar, seen = stack.behind_sidecar()
    ops = admin.create_service("ops-console", ["mt5:call", "admin:system"], is_trusted=True)
    untrusted = admin.create_service("dashboard", ["mt5:call", "admin:*"])
    trusted_without_scope = admin.create_service("auditor", ["mt5:call"], is_trusted=True)
    sidecar.wait_accepts(trusted_without_scope["api_key"])

    def get(svc: dict[str, str], path: str) -> httpx.Response:
        with client_from(CALLER_ADDRESS, headers={"Authorization": f"Bearer {svc['api_key']}"}) as http:
            return http.get(f"{sidecar.url}{path}")

    r = get(ops, "/api/v1/admin/stats")
    assert r.status_code == 200 and r.json()["caller"]["trusted"] is True
    for path in ("/api/v1/admin/stats", "/api/v1/admin/ping"):
        r = get(untrusted, path)  # admin:* grants admin:system; trust is still missing
        assert r.status_code == 403 and "www-authenticate" not in r.headers
        assert body(r) == {
            "error": "access_denied",
            "error_description": "This route requires a trusted service client",
        }
    r = get(trusted_without_scope, "/api/v1/admin/stats")
    assert r.status_code == 403 and r.headers["www-authenticate"].endswith('scope="admin:system"')
    assert get(trusted_without_scope, "/api/v1/admin/ping").status_code == 200
    # A token carries trust only if its service is trusted (the sidecar checks both).
    tc = TokenClient(admin.token_url, ops["service_id"], ops["client_secret"])
    with client_from(CALLER_ADDRESS, auth=tc.auth) as http:
        assert http.get(f"{sidecar.url}/api/v1/admin/stats").json()["caller"]["trusted"] is True
    assert seen.count("stats") == 2 and seen.count("ping") == 1
    tc.close()


def test_forged_identity_headers_from_a_non_sidecar_address_are_refused(stack: Stack) -> None:
    admin, app_server, sidecar, seen = stack.behind_sidecar()
    ops = admin.create_service("ops-console", ["mt5:call", "admin:system"], is_trusted=True)
    dash = admin.create_service("dashboard", ["mt5:call", "trade:read", "account:read"])
    sidecar.wait_accepts(dash["api_key"])
    forged = {
        "X-Permiso-Service-Id": ops["service_id"],
        "X-Permiso-Service-Name": "ops-console",
        "X-Permiso-Scopes": "admin:* trade:* account:*",
        "X-Permiso-Key-Id": ops["key_id"],
        "X-Permiso-Environment": "live",
        "X-Permiso-Trusted": "true",
    }
    # Straight to the app, bypassing the sidecar, from an address that is not the sidecar's.
    with client_from(FORGER_ADDRESS, headers=forged) as http:
        for method, path in [
            ("GET", "/api/v1/whoami"),
            ("GET", "/api/v1/trades"),
            ("POST", "/api/v1/trades"),
            ("GET", "/api/v1/admin/stats"),
        ]:
            r = http.request(method, f"{app_server.url}{path}")
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"] == REALM
            assert body(r) == {"error": "unauthorized", "error_description": "A Bearer credential is required"}
        # A real credential does not help either: the app does not read Authorization here.
        r = http.get(f"{app_server.url}/api/v1/whoami", headers={"Authorization": f"Bearer {ops['api_key']}"})
        assert r.status_code == 401
    assert seen == ["whoami"]  # only wait_accepts' call, through the sidecar

    # Through the sidecar, the caller's own X-Permiso-* headers are dropped and replaced.
    with client_from(CALLER_ADDRESS, headers={**forged, "Authorization": f"Bearer {dash['api_key']}"}) as http:
        me = http.get(f"{sidecar.url}/api/v1/whoami").json()
        assert (me["service_id"], me["trusted"], me["key_id"]) == (dash["service_id"], False, dash["key_id"])
        assert http.get(f"{sidecar.url}/api/v1/admin/stats").status_code == 403

    # What the gate trusts is the address, nothing else: from the sidecar's address (here
    # 127.0.0.1) the headers are believed. Deploy the app where only its sidecar reaches it
    # from the configured addresses (loopback in the sidecar's network namespace).
    r = httpx.get(f"{app_server.url}/api/v1/whoami", headers=forged)
    assert r.status_code == 200 and r.json()["trusted"] is True


def test_uvicorn_proxy_headers_make_the_gate_refuse_not_accept(stack: Stack) -> None:
    """Served with uvicorn's default proxy_headers=True, the peer becomes the sidecar's
    X-Forwarded-For (the original caller): the gate then refuses every call (fail closed),
    and a forger's own X-Forwarded-For is not believed either. The README says to turn it off."""
    admin = stack.admin()
    app, seen = protected_app(lambda app: PermisoAuth.behind_sidecar(app, trusted_proxies=["127.0.0.1/32"]))
    server = stack.serve(app, proxy_headers=True)
    svc = admin.create_service("dashboard", ["mt5:call"])
    sidecar = stack.sidecar(admin, f"127.0.0.1:{server.port}", [{"prefix": "/api", "scopes": ["mt5:call"]}])
    with client_from(CALLER_ADDRESS, headers={"Authorization": f"Bearer {svc['api_key']}"}) as http:
        r = http.get(f"{sidecar.url}/api/v1/whoami")
    assert r.status_code == 401 and r.headers.get("server") == "uvicorn"  # the app's refusal
    with client_from(FORGER_ADDRESS, headers={"X-Forwarded-For": "127.0.0.1", "X-Permiso-Service-Id": "srv_x"}) as http:
        assert http.get(f"{server.url}/api/v1/whoami").status_code == 401
    assert seen == []


def test_scope_matching_agrees_with_the_sidecar(stack: Stack) -> None:
    """Differential: for every (held, needed) pair below, the real sidecar's verdict on a route
    requiring `needed` and permiso.scopes.allows(held, needed) must agree."""
    from permiso.scopes import allows

    admin = stack.admin()
    app, _ = protected_app(lambda app: PermisoAuth.behind_sidecar(app))
    server = stack.serve(app)
    needed = [
        "trade", "trade:read", "trade:*", "trade:read:x", "trade:read:*", "tradex:read", "trade.read",
        "Trade:read", "admin:system", "admin:*", "a:b", "a:b:c", "a:b:*", "a:bc", "a:b-c", "x_y:z",
    ]  # fmt: skip
    held_sets = [
        ["trade:*"], ["trade"], ["trade:read", "admin:*"], ["a:b:*"], ["a:*", "x_y:z"],
        ["trade:read:*", "Trade:read"], ["a:b", "trade.read"],
    ]  # fmt: skip
    sidecar = stack.sidecar(
        admin, f"127.0.0.1:{server.port}", [{"prefix": f"/d{i}", "scopes": [n]} for i, n in enumerate(needed)]
    )
    disagreements = []
    for n_set, held in enumerate(held_sets):
        svc = admin.create_service(f"held-{n_set}", held)
        key = svc["api_key"]
        sidecar.wait_accepts(key, "/d0")
        with client_from(CALLER_ADDRESS, headers={"Authorization": f"Bearer {key}"}) as http:
            for i, n in enumerate(needed):
                status = http.get(f"{sidecar.url}/d{i}").status_code
                # Allowed: forwarded, and the app has no such path (404); refused: 403.
                assert status in (403, 404), (held, n, status)
                if (status == 404) != allows(held, n):
                    disagreements.append((held, n, status))
    assert not disagreements


def test_the_module_level_guards_mean_behind_a_sidecar(stack: Stack) -> None:
    """The issue's spelling: `Depends(require_scopes("trade:read"))`, `Depends(require_trusted())`."""
    from typing import Any

    from fastapi import Depends, FastAPI

    from permiso.fastapi import Caller, install, require_scopes, require_trusted

    app = FastAPI()
    install(app)

    @app.get("/api/v1/trades")
    async def trades(caller: Caller = Depends(require_scopes("trade:read"))) -> dict[str, Any]:
        return {"by": caller.service_id}

    @app.get("/api/v1/admin/ping")
    async def ping(caller: Caller = Depends(require_trusted())) -> dict[str, Any]:
        return {"by": caller.service_id}

    admin = stack.admin()
    server = stack.serve(app)
    sidecar = stack.sidecar(admin, f"127.0.0.1:{server.port}", [{"prefix": "/api", "scopes": ["mt5:call"]}])
    reader = admin.create_service("reader", ["mt5:call", "trade:read"])
    other = admin.create_service("other", ["mt5:call"], is_trusted=True)
    sidecar.wait_accepts(other["api_key"], "/api/v1/admin/ping")
    with client_from(CALLER_ADDRESS) as http:

        def get(path: str, svc: dict[str, Any]) -> httpx.Response:
            return http.get(f"{sidecar.url}{path}", headers={"Authorization": f"Bearer {svc['api_key']}"})

        assert get("/api/v1/trades", reader).json() == {"by": reader["service_id"]}
        r = get("/api/v1/trades", other)
        assert r.status_code == 403 and body(r)["error"] == "insufficient_scope"
        assert get("/api/v1/admin/ping", other).status_code == 200
        r = get("/api/v1/admin/ping", reader)
        assert r.status_code == 403 and body(r)["error"] == "access_denied"
    # Straight to the app, not from the sidecar's address: refused whatever it claims.
    with client_from(FORGER_ADDRESS) as http:
        r = http.get(
            f"{server.url}/api/v1/admin/ping",
            headers={"X-Permiso-Service-Id": other["service_id"], "X-Permiso-Trusted": "true"},
        )
        assert r.status_code == 401
