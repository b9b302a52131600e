"""Permiso for Python services.

- :class:`TokenClient` / :class:`AsyncTokenClient`: OAuth2 client credentials with caching,
  single-flight refresh, back-off and an :class:`httpx.Auth` (``client.auth``).
- :mod:`permiso.fastapi`: FastAPI dependencies establishing the :class:`Caller` behind a
  sidecar, from a local JWT check or by introspection, and enforcing scopes and trust.
- :mod:`permiso.verify`: the same checks without FastAPI.
"""

from .caller import Caller, Denial
from .client import AsyncTokenClient, Token, TokenAuth, TokenClient, TokenError
from .scopes import allows, grants

__all__ = [
    "AsyncTokenClient",
    "Caller",
    "Denial",
    "Token",
    "TokenAuth",
    "TokenClient",
    "TokenError",
    "allows",
    "grants",
]

__version__ = "0.1.0"
