"""OAuth2 client credentials (RFC 6749 §4.4) against Permiso's token endpoint.

:class:`TokenClient` (threads) and :class:`AsyncTokenClient` (asyncio) fetch an access token,
keep it until ``exp - refresh_margin``, let one caller at a time refresh it (the others wait
for that one fetch and share its result, token or error), retry the token endpoint with
exponential back-off and jitter on 429, 5xx and connection failures (``Retry-After`` is
obeyed), and give an :class:`httpx.Auth` (``.auth``) that sends the token and, after a 401
from the resource, drops it, fetches a fresh one and resends the request once.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import logging
import math
import random as _random
import re
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote_plus

import httpx

__all__ = [
    "AsyncTokenClient",
    "AuthMethod",
    "Token",
    "TokenAuth",
    "TokenClient",
    "TokenError",
]

log = logging.getLogger("permiso.client")

AuthMethod = Literal["client_secret_basic", "client_secret_post", "tls_client_auth"]
#: A client certificate: a PEM file holding both, or ``(certfile, keyfile)``, or with a password.
CertTypes = str | tuple[str, str] | tuple[str, str, str]
VerifyTypes = bool | str | ssl.SSLContext

_RETRYABLE = frozenset({429, 500, 502, 503, 504})
#: Used when a token answer has no ``expires_in`` (Permiso always sends one).
DEFAULT_EXPIRES_IN = 300.0
#: Longer than any lifetime Permiso issues; a larger ``expires_in`` is a broken answer.
MAX_EXPIRES_IN = 86400.0 * 366


class TokenError(Exception):
    """The token endpoint refused or could not be reached (after the retries it allows).

    ``error`` and ``error_description`` are the RFC 6749 §5.2 fields when the endpoint
    answered with them (``invalid_client``, ``invalid_scope``, ``rate_limited``, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error: str | None = None,
        error_description: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error = error
        self.error_description = error_description
        self.retry_after = retry_after

    def _again(self) -> TokenError:
        """A copy to raise in another waiter (never one instance in two threads)."""
        return TokenError(
            str(self),
            status_code=self.status_code,
            error=self.error,
            error_description=self.error_description,
            retry_after=self.retry_after,
        )


@dataclass(frozen=True)
class Token:
    """A token answer. ``obtained_at`` is the client's clock when the request was sent."""

    access_token: str
    token_type: str
    expires_in: float
    scope: str | None
    obtained_at: float

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.expires_in

    def __repr__(self) -> str:  # never print the token itself
        return f"Token(scope={self.scope!r}, expires_in={self.expires_in}, obtained_at={self.obtained_at})"


def _ssl_context(verify: VerifyTypes, cert: CertTypes | None) -> VerifyTypes:
    """What httpx's ``verify`` takes, with the client certificate loaded into it."""
    if cert is None and not isinstance(verify, str):
        return verify
    if isinstance(verify, ssl.SSLContext):
        ctx = verify
    elif isinstance(verify, str):
        ctx = ssl.create_default_context(cafile=verify)
    elif verify:
        try:
            import certifi  # httpx's own default trust store

            ctx = ssl.create_default_context(cafile=certifi.where())
        except ImportError:  # pragma: no cover
            ctx = ssl.create_default_context()
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        if isinstance(cert, str):
            ctx.load_cert_chain(cert)
        elif len(cert) == 2:
            ctx.load_cert_chain(cert[0], cert[1])
        else:
            ctx.load_cert_chain(cert[0], cert[1], cert[2])
    return ctx


def _retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT (RFC 9110 §5.6.7)
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - now)


class _Config:
    """What both clients share: the request, the answer's reading, the freshness rule and the
    back-off schedule. No I/O."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str | None,
        scope: str | Sequence[str] | None,
        auth_method: AuthMethod,
        refresh_margin: float,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
        max_retry_after: float,
        retry_401_interval: float,
        clock: Callable[[], float],
        random: Callable[[], float],
    ) -> None:
        if auth_method not in ("client_secret_basic", "client_secret_post", "tls_client_auth"):
            raise ValueError(f"unknown auth_method {auth_method!r}")
        if auth_method != "tls_client_auth" and not client_secret:
            raise ValueError(f"{auth_method} needs a client_secret")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.token_url = token_url
        self.client_id = client_id
        self.client_secret = client_secret
        self.scope = scope if scope is None or isinstance(scope, str) else " ".join(scope)
        self.auth_method = auth_method
        self.refresh_margin = refresh_margin
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.retry_401_interval = retry_401_interval
        self.clock = clock
        self.random = random

    def fresh(self, token: Token | None) -> bool:
        """Usable until ``expires_at - margin``; the margin is at most half the lifetime, so
        a short-lived token is still reused."""
        if token is None:
            return False
        margin = min(self.refresh_margin, token.expires_in / 2)
        return self.clock() < token.expires_at - margin

    def request(self) -> tuple[dict[str, str], dict[str, str]]:
        data = {"grant_type": "client_credentials"}
        if self.scope:
            data["scope"] = self.scope
        headers = {"Accept": "application/json"}
        if self.auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: each part form-urlencoded, then base64.
            raw = f"{quote_plus(self.client_id, safe='')}:{quote_plus(self.client_secret or '', safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
        elif self.auth_method == "client_secret_post":
            data["client_id"] = self.client_id
            data["client_secret"] = self.client_secret or ""
        else:  # tls_client_auth (RFC 8705 §2.1): the certificate proves the client
            data["client_id"] = self.client_id
        return headers, data

    def read(self, response: httpx.Response, sent_at: float) -> Token:
        """The token, or a :class:`TokenError` (with ``retry_after`` when worth retrying)."""
        if response.status_code == 200:
            try:
                body = response.json()
                access_token = body["access_token"]
                token_type = body.get("token_type", "Bearer")
                expires_in = float(body.get("expires_in", DEFAULT_EXPIRES_IN))
            except (ValueError, KeyError, TypeError) as e:
                raise TokenError(f"token endpoint answered 200 without a token: {e}", status_code=200) from None
            if not isinstance(access_token, str) or not access_token or str(token_type).lower() != "bearer":
                raise TokenError("token endpoint answered a non-Bearer token", status_code=200)
            if not (math.isfinite(expires_in) and 0 < expires_in <= MAX_EXPIRES_IN):
                raise TokenError(f"token endpoint answered expires_in={expires_in}", status_code=200)
            return Token(access_token, "Bearer", expires_in, body.get("scope"), sent_at)
        error = description = None
        try:
            body = response.json()
            if isinstance(body, dict):
                error, description = body.get("error"), body.get("error_description")
        except ValueError:
            pass
        raise TokenError(
            f"token endpoint answered {response.status_code}"
            + (f" {error}" if error else "")
            + (f": {description}" if description else ""),
            status_code=response.status_code,
            error=error,
            error_description=description,
            retry_after=_retry_after(response.headers.get("Retry-After"), self.clock()),
        )

    def backoff(self, attempt: int, err: TokenError) -> float | None:
        """How long to wait before attempt ``attempt + 1``; ``None``: give up now."""
        if attempt + 1 >= self.max_attempts:
            return None
        if err.status_code is not None and err.status_code not in _RETRYABLE:
            return None
        if err.retry_after is not None:
            # Obeyed as sent; a wait longer than we are willing to block is an error now.
            return err.retry_after if err.retry_after <= self.max_retry_after else None
        # Exponential with "equal jitter": half fixed, half random.
        cap = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        return cap / 2 + self.random() * cap / 2


class _State:
    """The cached token and the single-flight bookkeeping both clients share; each client
    calls these under its own lock (``threading.Lock`` / ``asyncio.Lock``). No I/O."""

    def __init__(self, cfg: _Config) -> None:
        self.cfg = cfg
        self.token: Token | None = None
        #: Bumped when a fetch ends: a caller that saw another value before taking the lock
        #: waited for that fetch, and shares its result.
        self.generation = 0
        self.error: TokenError | None = None
        self.last_401_drop: float | None = None
        self.fetches = 0

    def fresh(self) -> Token | None:
        return self.token if self.cfg.fresh(self.token) else None

    def begin(self, seen: int) -> Token | None:
        """Under the lock: the token a fetch that ended meanwhile got (or its error, raised),
        else ``None``: this caller fetches."""
        tok = self.fresh()
        if tok is not None:
            return tok
        if self.generation != seen and self.error is not None:
            raise self.error._again()
        self.error = None
        return None

    def ended(self, result: Token | BaseException) -> None:
        """Under the lock, whatever the fetch gave. A cancelled caller leaves no error behind:
        the callers that waited for it fetch for themselves."""
        self.generation += 1
        if isinstance(result, Token):
            self.token = result
            self.fetches += 1
        elif isinstance(result, TokenError):
            self.error = result
        elif not isinstance(result, asyncio.CancelledError):
            self.error = TokenError(f"token fetch failed: {result!r}")

    def invalidate(self, access_token: str | None) -> None:
        if access_token is None or (self.token is not None and self.token.access_token == access_token):
            self.token = None

    def refused(self, access_token: str) -> bool:
        """The resource answered 401 to ``access_token``: whether to resend the request.

        A token already replaced: resend with the current one. Otherwise drop it and resend,
        unless a 401 already dropped one less than ``retry_401_interval`` ago: a resource that
        refuses every token (wrong audience, a scope it wants) must not turn each request into
        a token request."""
        if self.token is None or self.token.access_token != access_token:
            return True
        now = self.cfg.clock()
        if self.last_401_drop is not None and now - self.last_401_drop < self.cfg.retry_401_interval:
            return False
        self.token, self.last_401_drop = None, now
        return True


class TokenClient:
    """Client credentials for threaded code.

    ``token_url`` is Permiso's ``<admin plane>/oauth/token``; ``client_id`` is the service id
    (``srv_…``), ``client_secret`` its ``pcs_…`` secret. ``scope`` (a string or a list) asks
    for fewer scopes than the client holds; ``None`` asks for all of them.

    ``auth_method``: ``"client_secret_basic"`` (default), ``"client_secret_post"``, or
    ``"tls_client_auth"`` (RFC 8705: no secret, the certificate authenticates). ``cert``
    (``(certfile, keyfile)``) presents a client certificate to the token endpoint, which then
    binds the token to it; ``verify`` is a CA file, ``True`` (httpx's default roots), ``False``
    or an :class:`ssl.SSLContext`.

    ``clock`` and ``sleep`` are injectable (tests move time instead of waiting); ``random``
    draws the back-off jitter. ``http_client`` replaces the internal :class:`httpx.Client`
    (then ``cert``, ``verify`` and ``timeout`` are the caller's business).
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str | None,
        scope: str | Sequence[str] | None = None,
        *,
        auth_method: AuthMethod = "client_secret_basic",
        cert: CertTypes | None = None,
        verify: VerifyTypes = True,
        timeout: float = 10.0,
        refresh_margin: float = 30.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        retry_401_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = _random.random,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._cfg = _Config(
            token_url, client_id, client_secret, scope, auth_method, refresh_margin,
            max_attempts, backoff_base, backoff_max, max_retry_after, retry_401_interval, clock, random,
        )  # fmt: skip
        self._sleep = sleep
        self._own_http = http_client is None
        self._http = http_client or httpx.Client(verify=_ssl_context(verify, cert), timeout=timeout)
        self._lock = threading.Lock()
        self._state = _State(self._cfg)

    @property
    def fetches(self) -> int:
        """Tokens fetched so far (for metrics and logs)."""
        return self._state.fetches

    # The token.

    def token(self) -> Token:
        """The cached token, or a new one (one fetch at a time; waiters share its result)."""
        tok = self._state.fresh()
        if tok is not None:
            return tok
        seen = self._state.generation
        with self._lock:
            tok = self._state.begin(seen)
            if tok is not None:
                return tok
            try:
                tok = self._fetch()
            except BaseException as e:
                self._state.ended(e)
                raise
            self._state.ended(tok)
            return tok

    def get_token(self) -> str:
        """The access token string (see :meth:`token`)."""
        return self.token().access_token

    def invalidate(self, access_token: str | None = None) -> None:
        """Forget the cached token (only if it is still ``access_token``, when given), so the
        next call fetches a new one."""
        with self._lock:
            self._state.invalidate(access_token)

    def refused(self, access_token: str) -> bool:
        """The resource answered 401 to ``access_token``: whether to resend the request (the
        next :meth:`get_token` then gives a fresh token). See ``retry_401_interval``."""
        with self._lock:
            return self._state.refused(access_token)

    def _fetch(self) -> Token:
        headers, data = self._cfg.request()
        attempt = 0
        while True:
            sent_at = self._cfg.clock()
            try:
                response = self._http.post(self._cfg.token_url, data=data, headers=headers)
                return self._cfg.read(response, sent_at)
            except httpx.TransportError as e:
                err = TokenError(f"token endpoint unreachable: {e!r}")
            except TokenError as e:
                err = e
            wait = self._cfg.backoff(attempt, err)
            if wait is None:
                raise err
            log.warning("token request failed (%s); retrying in %.2f s", err, wait)
            self._sleep(wait)
            attempt += 1

    # httpx integration and lifetime.

    @property
    def auth(self) -> TokenAuth:
        """An :class:`httpx.Auth` for ``httpx.Client(auth=...)``."""
        return TokenAuth(self)

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTokenClient:
    """:class:`TokenClient` for asyncio: the same arguments, ``await client.get_token()``;
    ``sleep`` defaults to :func:`asyncio.sleep` and ``http_client`` is an
    :class:`httpx.AsyncClient`. Use one instance per event loop."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str | None,
        scope: str | Sequence[str] | None = None,
        *,
        auth_method: AuthMethod = "client_secret_basic",
        cert: CertTypes | None = None,
        verify: VerifyTypes = True,
        timeout: float = 10.0,
        refresh_margin: float = 30.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        retry_401_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._cfg = _Config(
            token_url, client_id, client_secret, scope, auth_method, refresh_margin,
            max_attempts, backoff_base, backoff_max, max_retry_after, retry_401_interval, clock, random,
        )  # fmt: skip
        self._sleep = sleep
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(verify=_ssl_context(verify, cert), timeout=timeout)
        self._lock: asyncio.Lock | None = None
        self._state = _State(self._cfg)

    @property
    def fetches(self) -> int:
        """Tokens fetched so far (for metrics and logs)."""
        return self._state.fetches

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def token(self) -> Token:
        tok = self._state.fresh()
        if tok is not None:
            return tok
        seen = self._state.generation
        async with self._get_lock():
            tok = self._state.begin(seen)
            if tok is not None:
                return tok
            try:
                tok = await self._fetch()
            except BaseException as e:
                self._state.ended(e)
                raise
            self._state.ended(tok)
            return tok

    async def get_token(self) -> str:
        return (await self.token()).access_token

    async def invalidate(self, access_token: str | None = None) -> None:
        async with self._get_lock():
            self._state.invalidate(access_token)

    async def refused(self, access_token: str) -> bool:
        """See :meth:`TokenClient.refused`."""
        async with self._get_lock():
            return self._state.refused(access_token)

    async def _fetch(self) -> Token:
        headers, data = self._cfg.request()
        attempt = 0
        while True:
            sent_at = self._cfg.clock()
            try:
                response = await self._http.post(self._cfg.token_url, data=data, headers=headers)
                return self._cfg.read(response, sent_at)
            except httpx.TransportError as e:
                err = TokenError(f"token endpoint unreachable: {e!r}")
            except TokenError as e:
                err = e
            wait = self._cfg.backoff(attempt, err)
            if wait is None:
                raise err
            log.warning("token request failed (%s); retrying in %.2f s", err, wait)
            await self._sleep(wait)
            attempt += 1

    @property
    def auth(self) -> TokenAuth:
        return TokenAuth(self)

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncTokenClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class TokenAuth(httpx.Auth):
    """Sends ``Authorization: Bearer <token>``; on a 401 from the resource, forgets that
    token, fetches a fresh one and resends the request once (the body is buffered for that),
    but at most once per ``retry_401_interval`` (5 s): after that the 401 is returned as is.

    Works with ``httpx.Client`` given a :class:`TokenClient`, and with ``httpx.AsyncClient``
    given an :class:`AsyncTokenClient` (or a :class:`TokenClient`, whose fetch then runs in a
    worker thread so the event loop is not blocked).
    """

    requires_request_body = True

    def __init__(self, client: TokenClient | AsyncTokenClient, *, retry_on_401: bool = True) -> None:
        self._client = client
        self._retry_on_401 = retry_on_401

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        client = self._client
        if not isinstance(client, TokenClient):
            raise TypeError("an AsyncTokenClient's auth needs httpx.AsyncClient; use TokenClient with httpx.Client")
        request.read()
        token = client.get_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401 and self._retry_on_401 and client.refused(token):
            log.info("resource answered 401; retrying once with a fresh token")
            request.headers["Authorization"] = f"Bearer {client.get_token()}"
            yield request

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        client = self._client
        await request.aread()
        token = await self._get(client)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401 and self._retry_on_401:
            if isinstance(client, AsyncTokenClient):
                resend = await client.refused(token)
            else:
                resend = await asyncio.to_thread(client.refused, token)
            if resend:
                log.info("resource answered 401; retrying once with a fresh token")
                request.headers["Authorization"] = f"Bearer {await self._get(client)}"
                yield request

    @staticmethod
    async def _get(client: TokenClient | AsyncTokenClient) -> str:
        if isinstance(client, AsyncTokenClient):
            return await client.get_token()
        return await asyncio.to_thread(client.get_token)
