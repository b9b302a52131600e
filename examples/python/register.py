"""Registers the example's service accounts on the admin plane and prints their credentials
as shell ``export`` lines (``eval "$(python examples/python/register.py)"``).

- ``mt5-sidecar`` (``sync:read``): the MT5 sidecar's sync key → ``PERMISO_SYNC_KEY``
- ``mt5-api-service`` (``token:introspect``): the MT5 API's own client, for introspection
  mode → ``MT5_CLIENT_ID``, ``MT5_CLIENT_SECRET``
- ``trading-dashboard`` (``trade:read trade:open account:read market:data``, tokens of
  1800 s, not trusted) → ``DASHBOARD_CLIENT_ID``, ``DASHBOARD_CLIENT_SECRET``, ``DASHBOARD_KEY``
- ``ops-console`` (``admin:system account:read``, trusted) → ``OPS_CLIENT_ID``,
  ``OPS_CLIENT_SECRET``

A service registered before gets new credentials (the old ones end at once: restart whatever
runs with them), so the script can run again. The admin key comes from ``PERMISO_ADMIN_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

import httpx

SERVICES: list[tuple[str, str, dict[str, Any]]] = [
    ("MT5_SIDECAR", "mt5-sidecar", {"scopes": ["sync:read"], "description": "the MT5 sidecar's sync credential"}),
    (
        "MT5",
        "mt5-api-service",
        {"scopes": ["token:introspect"], "description": "MT5 API (introspects callers' tokens)"},
    ),
    (
        "DASHBOARD",
        "trading-dashboard",
        {
            "scopes": ["trade:read", "trade:open", "account:read", "market:data"],
            "access_token_lifetime": 1800,
            "description": "Trading Dashboard Web App",
        },
    ),
    (
        "OPS",
        "ops-console",
        {"scopes": ["admin:system", "account:read"], "is_trusted": True, "description": "operations"},
    ),
]


def register(admin: httpx.Client, name: str, fields: dict[str, Any]) -> dict[str, str]:
    r = admin.post("/auth/admin/services", json={"service_name": name, **fields})
    if r.status_code == 201:
        v = r.json()
        return {"service_id": v["service_id"], "api_key": v["api_key"], "client_secret": v["client_secret"]}
    if r.status_code != 409:
        sys.exit(f"creating {name}: {r.status_code} {r.text}")
    # Registered before: find it and replace its credentials.
    page = admin.get("/auth/admin/services", params={"search": name, "limit": 200})
    page.raise_for_status()
    found = [s for s in page.json()["services"] if s["service_name"].lower() == name.lower()]
    if not found:
        sys.exit(f"{name} exists but was not found")
    sid = found[0]["service_id"]
    key = admin.post(f"/auth/admin/services/{sid}/rotate", json={"grace_seconds": 0})
    secret = admin.post(f"/auth/admin/services/{sid}/secret/rotate", json={"grace_seconds": 0})
    for what, resp in (("key", key), ("secret", secret)):
        if resp.status_code != 200:
            sys.exit(f"rotating the {what} of {name}: {resp.status_code} {resp.text}")
    return {"service_id": sid, "api_key": key.json()["api_key"], "client_secret": secret.json()["client_secret"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-url", default=os.environ.get("PERMISO_ADMIN_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--json", action="store_true", help="print JSON instead of export lines")
    args = parser.parse_args()
    admin_key = os.environ.get("PERMISO_ADMIN_API_KEY")
    if not admin_key:
        parser.error("set PERMISO_ADMIN_API_KEY")
    out: dict[str, str] = {}
    with httpx.Client(base_url=args.admin_url, headers={"X-Admin-Api-Key": admin_key}, timeout=10) as admin:
        for prefix, name, fields in SERVICES:
            creds = register(admin, name, fields)
            if prefix == "MT5_SIDECAR":
                out["PERMISO_SYNC_KEY"] = creds["api_key"]
                continue
            out[f"{prefix}_CLIENT_ID"] = creds["service_id"]
            out[f"{prefix}_CLIENT_SECRET"] = creds["client_secret"]
            if prefix == "DASHBOARD":
                out["DASHBOARD_KEY"] = creds["api_key"]
        # The issuer the tokens carry, as the admin plane announces it (RFC 8414).
        meta = admin.get("/.well-known/oauth-authorization-server").json()
    out["PERMISO_TOKEN_URL"] = meta["token_endpoint"]
    out["PERMISO_ISSUER"] = meta["issuer"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for k, v in out.items():
            print(f"export {k}={shlex.quote(v)}")


if __name__ == "__main__":
    main()
