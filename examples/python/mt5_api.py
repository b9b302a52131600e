"""The MT5 Trading API of seed 002 as a FastAPI app, protected with permiso.fastapi.

One switch picks how callers are established (``--mode`` or ``MT5_AUTH_MODE``):

- ``sidecar`` (default): behind ``permiso sidecar``; the caller comes from the X-Permiso-*
  headers, believed only from ``PERMISO_TRUSTED_PROXIES`` (default ``127.0.0.1/32,::1/128``).
- ``jwt``: standalone; ``Authorization: Bearer <JWT>`` verified locally against the admin
  plane's JWKS (``PERMISO_ISSUER``, default ``http://127.0.0.1:8000``; ``PERMISO_AUDIENCE``,
  default ``permiso``; ``PERMISO_JWKS_URL``, default ``<issuer>/.well-known/jwks.json``).
- ``introspection``: standalone; the bearer credential checked by RFC 7662 introspection
  (``PERMISO_INTROSPECTION_URL``, default ``<issuer>/oauth/introspect``) with this service's
  own client credentials ``MT5_CLIENT_ID`` / ``MT5_CLIENT_SECRET`` (a service holding
  ``token:introspect``), answers cached ``PERMISO_INTROSPECTION_TTL`` seconds (default 10).

Run: ``python examples/python/mt5_api.py --mode sidecar --port 8101``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, Field

from permiso.fastapi import Caller, PermisoAuth

MODES = ("sidecar", "jwt", "introspection")


class TradeRequest(BaseModel):
    symbol: str = Field(min_length=3, max_length=12)
    volume: float = Field(gt=0, le=100)
    trade_type: Literal["buy", "sell"] = "buy"
    price: float | None = None
    stop_loss: float | None = None
    take_profit: float | None = None


class Trade(BaseModel):
    trade_id: int
    symbol: str
    volume: float
    trade_type: str
    open_price: float
    stop_loss: float | None = None
    take_profit: float | None = None
    opened_by: str


# A tiny deterministic "MT5 terminal".
QUOTES = {
    "EURUSD": (1.0841, 1.0843),
    "GBPUSD": (1.2702, 1.2705),
    "USDJPY": (151.21, 151.24),
    "XAUUSD": (2331.1, 2331.6),
}


def make_auth(app: FastAPI, mode: str, env: Mapping[str, str]) -> PermisoAuth:
    issuer = env.get("PERMISO_ISSUER", "http://127.0.0.1:8000")
    if mode == "sidecar":
        proxies = env.get("PERMISO_TRUSTED_PROXIES", "127.0.0.1/32,::1/128").split(",")
        return PermisoAuth.behind_sidecar(app, trusted_proxies=[p.strip() for p in proxies if p.strip()])
    if mode == "jwt":
        return PermisoAuth.jwt(
            app,
            issuer=issuer,
            audience=env.get("PERMISO_AUDIENCE", "permiso"),
            jwks_url=env.get("PERMISO_JWKS_URL") or None,
        )
    if mode == "introspection":
        return PermisoAuth.introspection(
            app,
            url=env.get("PERMISO_INTROSPECTION_URL", f"{issuer}/oauth/introspect"),
            client_id=env["MT5_CLIENT_ID"],
            client_secret=env["MT5_CLIENT_SECRET"],
            cache_ttl=float(env.get("PERMISO_INTROSPECTION_TTL", "10")),
        )
    raise ValueError(f"mode must be one of {MODES}, not {mode!r}")


def create_app(mode: str | None = None, env: Mapping[str, str] | None = None) -> FastAPI:
    env = os.environ if env is None else env
    mode = mode or env.get("MT5_AUTH_MODE", "sidecar")
    app = FastAPI(title="MT5 Trading API", description=f"Seed 002's MT5 API, Permiso mode: {mode}", version="1.0.0")
    auth = make_auth(app, mode, env)
    trades: dict[int, Trade] = {}
    ids = itertools.count(1001)
    lock = threading.Lock()
    started = time.time()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "healthy", "service": "mt5-api", "auth_mode": mode}

    @app.get("/api/v1/trades")
    async def list_trades(
        caller: Caller = Depends(auth.require_scopes("trade:read", "account:read")),
    ) -> dict[str, Any]:
        mine = [t for t in trades.values() if t.opened_by == caller.service_id]
        return {"trades": mine, "requested_by": caller.service_id}

    @app.post("/api/v1/trades", status_code=201)
    async def open_trade(request: TradeRequest, caller: Caller = Depends(auth.require_scopes("trade:open"))) -> Trade:
        quote = QUOTES.get(request.symbol.upper())
        if quote is None:
            raise HTTPException(400, f"unknown symbol {request.symbol}")
        price = request.price or (quote[1] if request.trade_type == "buy" else quote[0])
        with lock:
            trade = Trade(
                trade_id=next(ids),
                symbol=request.symbol.upper(),
                volume=request.volume,
                trade_type=request.trade_type,
                open_price=price,
                stop_loss=request.stop_loss,
                take_profit=request.take_profit,
                opened_by=caller.service_id,
            )
            trades[trade.trade_id] = trade
        return trade

    @app.delete("/api/v1/trades/{trade_id}")
    async def close_trade(
        trade_id: int, caller: Caller = Depends(auth.require_scopes("trade:close"))
    ) -> dict[str, Any]:
        with lock:
            trade = trades.get(trade_id)
            if trade is None or trade.opened_by != caller.service_id:
                raise HTTPException(404, "no such trade")
            del trades[trade_id]
        return {"message": "Trade closed successfully", "trade_id": trade_id}

    @app.get("/api/v1/account")
    async def account(caller: Caller = Depends(auth.require_scopes("account:read"))) -> dict[str, Any]:
        return {
            "login": 5_001_234,
            "server": "Demo-MT5",
            "currency": "USD",
            "leverage": 100,
            "requested_by": caller.service_id,
        }

    @app.get("/api/v1/account/balance")
    # Both, as at the sidecar (its /api/v1/account route covers this path too).
    async def balance(
        caller: Caller = Depends(auth.require_scopes("account:read", "account:balance")),
    ) -> dict[str, Any]:
        return {"balance": 10_000.0, "equity": 10_012.5, "margin": 108.4, "free_margin": 9_904.1, "currency": "USD"}

    @app.get("/api/v1/market/{symbol}")
    async def market(symbol: str, caller: Caller = Depends(auth.require_scopes("market:data"))) -> dict[str, Any]:
        quote = QUOTES.get(symbol.upper())
        if quote is None:
            raise HTTPException(404, f"unknown symbol {symbol}")
        return {"symbol": symbol.upper(), "bid": quote[0], "ask": quote[1], "spread": round(quote[1] - quote[0], 5)}

    # Seed 002's admin endpoint: a trusted service client holding admin:system.
    @app.get("/api/v1/admin/stats")
    async def admin_stats(caller: Caller = Depends(auth.require("admin:system", trusted=True))) -> dict[str, Any]:
        return {
            "open_trades": len(trades),
            "uptime_seconds": round(time.time() - started, 1),
            "auth_mode": mode,
            "requested_by": caller.service_id,
        }

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default=os.environ.get("MT5_AUTH_MODE", "sidecar"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    # proxy_headers=False: the sidecar mode judges the TCP peer, never X-Forwarded-For.
    uvicorn.run(create_app(args.mode), host=args.host, port=args.port, proxy_headers=False, log_level="info")


if __name__ == "__main__":
    main()
