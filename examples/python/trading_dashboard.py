"""The trading dashboard of seed 002: a client of the MT5 API using permiso.TokenClient.

It gets an access token by client credentials (``DASHBOARD_CLIENT_ID`` /
``DASHBOARD_CLIENT_SECRET``, the ``client_id`` and ``client_secret`` of the service
``trading-dashboard``), then calls the MT5 API through ``httpx.Client(auth=tokens.auth)``: the
token is fetched once, reused, refreshed before it expires and replaced after a 401.

It checks what it gets: quotes, account, a trade opened and listed are allowed; the balance
(``account:balance``) and the admin statistics (trusted clients only) are refused with 403.
Exit status 0 when every answer is the expected one.

Run: ``python examples/python/trading_dashboard.py --api http://127.0.0.1:9101``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx

from permiso import TokenClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", default="http://127.0.0.1:9101", help="the MT5 API: its sidecar, or the app itself")
    parser.add_argument("--token-url", default=os.environ.get("PERMISO_TOKEN_URL", "http://127.0.0.1:8000/oauth/token"))
    parser.add_argument("--client-id", default=os.environ.get("DASHBOARD_CLIENT_ID"))
    parser.add_argument(
        "--auth-method", default="client_secret_basic", choices=["client_secret_basic", "client_secret_post"]
    )
    args = parser.parse_args()
    # The secret only from the environment: on the command line it would show in `ps` and in
    # the shell's history.
    secret = os.environ.get("DASHBOARD_CLIENT_SECRET")
    if not args.client_id or not secret:
        parser.error("set DASHBOARD_CLIENT_ID (or --client-id) and DASHBOARD_CLIENT_SECRET")

    tokens = TokenClient(args.token_url, args.client_id, secret, auth_method=args.auth_method)
    steps = [
        ("GET", "/api/v1/market/EURUSD", None, 200),
        ("GET", "/api/v1/account", None, 200),
        ("POST", "/api/v1/trades", {"symbol": "EURUSD", "volume": 0.1, "trade_type": "buy"}, 201),
        ("GET", "/api/v1/trades", None, 200),
        ("GET", "/api/v1/account/balance", None, 403),  # the dashboard lacks account:balance
        ("GET", "/api/v1/admin/stats", None, 403),  # trusted service clients only
    ]
    failures = 0
    with tokens, httpx.Client(base_url=args.api, auth=tokens.auth, timeout=10) as mt5:
        for method, path, body, expected in steps:
            r = mt5.request(method, path, json=body)
            ok = r.status_code == expected
            failures += not ok
            detail = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
            if "www-authenticate" in r.headers and isinstance(detail, dict):
                detail = {"www-authenticate": r.headers["www-authenticate"], **detail}
            verdict = "ok " if ok else "BAD"
            print(f"{verdict}  {method} {path} -> {r.status_code} (expected {expected}) {json.dumps(detail)}")
        print(f"{len(steps)} calls, {tokens.fetches} token fetched; {failures} unexpected answers")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
