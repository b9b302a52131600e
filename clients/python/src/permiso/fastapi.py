"""FastAPI dependencies: who called, and may they call this route.

Pick the mode once, then guard each route::

    from fastapi import Depends, FastAPI
    from permiso.fastapi import Caller, PermisoAuth

    app = FastAPI()
    auth = PermisoAuth.behind_sidecar(app, trusted_proxies=["127.0.0.1/32"])
    # or PermisoAuth.jwt(app, issuer="http://127.0.0.1:8000", audience="permiso")
    # or PermisoAuth.introspection(app, url=".../oauth/introspect", client_id=..., client_secret=...)

    @app.get("/api/v1/trades")
    async def trades(caller: Caller = Depends(auth.require_scopes("trade:read"))):
        return {"caller": caller.service_id}

Every refusal is the sidecar's own answer: 401 with ``WWW-Authenticate: Bearer
realm="permiso"…``, 403 ``insufficient_scope`` naming the route's scopes, 403
``access_denied`` for an untrusted caller, JSON ``{"error", "error_description"}``. Passing
``app`` installs the exception handler that writes that body (:func:`install`); without it
the status and headers are the same and FastAPI writes its own ``{"detail": …}`` body.
"""

# No `from __future__ import annotations` here: FastAPI reads these signatures at run time.

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from starlette.responses import Response

from . import scopes as _scopes
from .caller import Caller, Denial
from .verify import Introspector, JwtVerifier, SidecarGate, bearer_token

__all__ = [
    "Caller",
    "Denial",
    "IntrospectionAuth",
    "JWTBearer",
    "PermisoAuth",
    "PermisoDenied",
    "SidecarIdentity",
    "install",
    "introspection",
    "jwt_bearer",
    "require_scopes",
    "require_trusted",
    "sidecar_identity",
]

log = logging.getLogger("permiso.fastapi")

Dependency = Callable[..., Awaitable[Caller]]


class PermisoDenied(HTTPException):
    """Carries a :class:`Denial` through FastAPI; :func:`install` renders it."""

    def __init__(self, denial: Denial) -> None:
        super().__init__(denial.status, denial.description, headers={**denial.headers, "Cache-Control": "no-store"})
        self.denial = denial


async def _render(request: Request, exc: Exception) -> Response:
    d = exc.denial if isinstance(exc, PermisoDenied) else Denial(500, "server_error", "internal error")
    return Response(d.body_bytes(), status_code=d.status, headers=d.response_headers())


def install(app: FastAPI) -> None:
    """Make refusals answer the sidecar's JSON body (idempotent)."""
    app.add_exception_handler(PermisoDenied, _render)


_warned: set[int] = set()


def _check_installed(request: Request) -> None:
    """Say once per app, loudly, when refusals will not carry the sidecar's body."""
    app = request.app
    if PermisoDenied not in getattr(app, "exception_handlers", {PermisoDenied: None}) and id(app) not in _warned:
        _warned.add(id(app))
        log.error(
            'permiso.fastapi.install(app) was not called: refusals carry FastAPI\'s {"detail": ...} '
            'body instead of {"error", "error_description"} (status and WWW-Authenticate are '
            "right). Pass app= to the dependency's constructor or call install(app) at start."
        )


def _refuse(request: Request, denial: Denial) -> PermisoDenied:
    log.info("refused %s %s: %d %s", request.method, request.url.path, denial.status, denial.reason)
    return PermisoDenied(denial)


class PermisoAuth:
    """One way of establishing the caller, usable as a FastAPI dependency (``Depends(auth)``
    returns the :class:`Caller`), with the route guards :meth:`require_scopes`,
    :meth:`require_trusted` and :meth:`require`."""

    def __init__(self, app: FastAPI | None = None) -> None:
        if app is not None:
            install(app)

    async def authenticate(self, request: Request) -> Caller:  # pragma: no cover - abstract
        raise NotImplementedError

    async def __call__(self, request: Request) -> Caller:
        try:
            caller = await self.authenticate(request)
        except Denial as d:
            _check_installed(request)
            raise _refuse(request, d) from None
        request.state.permiso_caller = caller
        return caller

    def require(self, *scopes: str, trusted: bool = False) -> Dependency:
        """The caller must hold every one of ``scopes`` (``*`` wildcards as the sidecar) and,
        with ``trusted=True``, be a trusted service (checked first, as the sidecar does)."""
        for s in scopes:
            _scopes.validate(s)
        required = " ".join(scopes)

        async def guard(request: Request, caller: Caller = Depends(self)) -> Caller:
            if trusted and not caller.trusted:
                _check_installed(request)
                raise _refuse(request, Denial.not_trusted())
            if caller.missing_scopes(*scopes):
                _check_installed(request)
                raise _refuse(request, Denial.insufficient_scope(required))
            return caller

        return guard

    def require_scopes(self, *scopes: str) -> Dependency:
        """``Depends(auth.require_scopes("trade:read", "account:read"))``."""
        if not scopes:
            raise ValueError("require_scopes needs at least one scope")
        return self.require(*scopes)

    def require_trusted(self) -> Dependency:
        """Seed 002's admin endpoints: only a trusted service (``is_trusted``)."""
        return self.require(trusted=True)

    # The three modes.

    @staticmethod
    def behind_sidecar(
        app: FastAPI | None = None,
        trusted_proxies: Iterable[str] = ("127.0.0.1/32", "::1/128"),
        **options: bool,
    ) -> "SidecarIdentity":
        return SidecarIdentity(trusted_proxies, app=app, **options)

    @staticmethod
    def jwt(app: FastAPI | None = None, *, issuer: str, audience: str, **options: Any) -> "JWTBearer":
        return JWTBearer(issuer, audience, app=app, **options)

    @staticmethod
    def introspection(app: FastAPI | None = None, *, url: str, **options: Any) -> "IntrospectionAuth":
        return IntrospectionAuth(url, app=app, **options)


class SidecarIdentity(PermisoAuth):
    """Behind a Permiso sidecar: the caller from its ``X-Permiso-*`` headers, trusted only on
    requests whose TCP peer is in ``trusted_proxies`` (see :class:`permiso.verify.SidecarGate`;
    serve with uvicorn's ``proxy_headers=False``)."""

    def __init__(
        self,
        trusted_proxies: Iterable[str] = ("127.0.0.1/32", "::1/128"),
        *,
        app: FastAPI | None = None,
        allow_wide: bool = False,
        allow_forwarded_ips: bool = False,
    ) -> None:
        super().__init__(app)
        self.gate = SidecarGate(trusted_proxies, allow_wide=allow_wide, allow_forwarded_ips=allow_forwarded_ips)

    async def authenticate(self, request: Request) -> Caller:
        peer = request.client.host if request.client else None
        return self.gate.caller(peer, request.headers)


class JWTBearer(PermisoAuth):
    """Standalone: ``Authorization: Bearer <JWT>`` verified locally
    (:class:`permiso.verify.JwtVerifier`; its keyword options are accepted here)."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        *,
        app: FastAPI | None = None,
        leeway: float = 30.0,
        jwks_ttl: float = 300.0,
        refetch_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        super().__init__(app)
        self.verifier = JwtVerifier(
            issuer,
            audience,
            jwks_url,
            leeway=leeway,
            jwks_ttl=jwks_ttl,
            refetch_interval=refetch_interval,
            clock=clock,
            **options,
        )

    async def authenticate(self, request: Request) -> Caller:
        return await self.verifier.verify(bearer_token(request.headers.getlist("authorization")))


class IntrospectionAuth(PermisoAuth):
    """Standalone: the bearer credential (JWT or API key) checked by RFC 7662 introspection
    with a short cache (:class:`permiso.verify.Introspector`; its keyword options are
    accepted here: ``client_id``/``client_secret``, ``api_key`` or ``admin_key``,
    ``cache_ttl``, ``audience``, ``clock``, …)."""

    def __init__(self, url: str, *, app: FastAPI | None = None, **options: Any) -> None:
        super().__init__(app)
        self.introspector = Introspector(url, **options)

    async def authenticate(self, request: Request) -> Caller:
        return await self.introspector.verify(bearer_token(request.headers.getlist("authorization")))


# The same, as functions (the names the issue and the seeds use).


def sidecar_identity(
    trusted_proxies: Iterable[str] = ("127.0.0.1/32", "::1/128"), *, app: FastAPI | None = None, **options: bool
) -> SidecarIdentity:
    """``Depends(sidecar_identity([...]))`` gives the :class:`Caller` the sidecar named."""
    return SidecarIdentity(trusted_proxies, app=app, **options)


def jwt_bearer(issuer: str, audience: str, jwks_url: str | None = None, **options: Any) -> JWTBearer:
    """``jwt_bearer(issuer, audience, app=app)``: see :class:`JWTBearer`."""
    return JWTBearer(issuer, audience, jwks_url, **options)


def introspection(url: str, **options: Any) -> IntrospectionAuth:
    """``introspection(url, client_id=..., client_secret=..., app=app)``: see
    :class:`IntrospectionAuth`."""
    return IntrospectionAuth(url, **options)


_default_sidecar: SidecarIdentity | None = None


def _sidecar_default() -> SidecarIdentity:
    """The :func:`sidecar_identity` of the defaults (127.0.0.1, ::1), made on first use."""
    global _default_sidecar
    if _default_sidecar is None:
        _default_sidecar = SidecarIdentity()
    return _default_sidecar


def require_scopes(*scopes: str, auth: PermisoAuth | None = None) -> Dependency:
    """``Depends(require_scopes("trade:read"))``: the caller behind a sidecar (the defaults of
    :func:`sidecar_identity`) holds every scope; with ``auth=`` the same for that mode
    (``auth.require_scopes``)."""
    return (auth or _sidecar_default()).require_scopes(*scopes)


def require_trusted(*, auth: PermisoAuth | None = None) -> Dependency:
    """``Depends(require_trusted())``: a trusted caller behind a sidecar, or with ``auth=``."""
    return (auth or _sidecar_default()).require_trusted()
