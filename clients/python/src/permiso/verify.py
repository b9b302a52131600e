"""Establishing the :class:`~permiso.caller.Caller` of a request, framework-free.

- :class:`SidecarGate`: behind a Permiso sidecar, read the ``X-Permiso-*`` headers it sets,
  but only from a request whose TCP peer is one of the configured sidecar addresses.
- :class:`JwtVerifier`: standalone, verify Permiso's RFC 9068 access tokens locally against
  the admin plane's JWKS.
- :class:`Introspector`: standalone, ask the admin plane (RFC 7662) with a short cache.

Each raises :class:`~permiso.caller.Denial` with the sidecar's answer when it refuses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import hashlib
import ipaddress
import logging
import os
import re
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote_plus

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import scopes as _scopes
from .caller import Caller, Denial
from .client import VerifyTypes, _ssl_context

__all__ = ["Introspector", "JwtVerifier", "SidecarGate", "bearer_token"]

log = logging.getLogger("permiso.verify")

ALGORITHM = "EdDSA"
_TYPES = ("at+jwt", "application/at+jwt")


def bearer_token(authorization: Sequence[str]) -> str:
    """The credential of the request's ``Authorization`` header values, as the sidecar reads
    them: none or another scheme → 401 without error code; two headers, or bytes outside
    ASCII → 400."""
    if not authorization:
        raise Denial.missing_credential()
    if len(authorization) > 1:
        raise Denial.bad_request("duplicate_authorization")
    if not authorization[0].isascii():
        raise Denial.bad_request("authorization_not_ascii")
    scheme, _, token = authorization[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Denial.missing_credential("not_bearer")
    token = token.strip()
    if not token or not token.isascii():
        raise Denial.invalid_token("malformed")
    return token


# Behind a sidecar.

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SidecarGate:
    """Trusts ``X-Permiso-*`` only on requests from ``trusted_proxies`` (addresses or CIDRs).

    A request from anywhere else is refused (401) whatever headers it carries: a service
    reachable without its sidecar cannot be fooled by a caller who sets them itself. The
    address checked is the TCP peer as the ASGI server reports it: run uvicorn with
    ``proxy_headers=False`` (``--no-proxy-headers``), or it replaces the peer with the
    ``X-Forwarded-For`` the sidecar sends (the original caller's address). Worse, with
    ``--forwarded-allow-ips``/``FORWARDED_ALLOW_IPS`` widened, a direct caller's own
    ``X-Forwarded-For: 127.0.0.1`` would become the peer: the gate refuses to start when it
    sees that setting anywhere it can look (:func:`_refuse_forwarded_allow_ips`), unless
    ``allow_forwarded_ips=True`` says the operator knows why.

    ``trusted_proxies`` entries must be exact networks (``127.0.0.1/32``, not ``127.0.0.5/8``)
    and no wider than /8 (IPv4) or /32 (IPv6) unless ``allow_wide=True``: trusting half the
    internet is a typo, not a deployment.

    The headers are judged as the sidecar writes them: each at most once (two of one name is
    a forgery appended to the sidecar's own: 401), ``X-Permiso-Trusted`` exactly ``true`` or
    ``false``, ``X-Permiso-Scopes`` well-formed scopes separated by single spaces.
    """

    HEADERS = (
        "x-permiso-service-id",
        "x-permiso-service-name",
        "x-permiso-scopes",
        "x-permiso-key-id",
        "x-permiso-token-id",
        "x-permiso-environment",
        "x-permiso-trusted",
        "x-permiso-client-cert-identity",
    )

    def __init__(
        self,
        trusted_proxies: Iterable[str] = ("127.0.0.1/32", "::1/128"),
        *,
        allow_wide: bool = False,
        allow_forwarded_ips: bool = False,
    ) -> None:
        if isinstance(trusted_proxies, str):
            trusted_proxies = (trusted_proxies,)
        networks: list[_Network] = []
        for p in trusted_proxies:
            try:
                n = ipaddress.ip_network(p.strip(), strict=True)
            except ValueError as e:
                raise ValueError(f"trusted_proxies entry {p!r} is not an exact address or network: {e}") from None
            if isinstance(n, ipaddress.IPv6Network) and n.network_address.ipv4_mapped is not None and n.prefixlen >= 96:
                # ::ffff:a.b.c.d/n is the IPv4 network a.b.c.d/(n-96): peers are compared as IPv4.
                n = ipaddress.IPv4Network((n.network_address.ipv4_mapped, n.prefixlen - 96))
            widest = 8 if n.version == 4 else 32
            if n.prefixlen < widest and not allow_wide:
                raise ValueError(
                    f"trusted_proxies entry {p!r} is wider than /{widest}: list the sidecar's "
                    "addresses (or pass allow_wide=True if that is really meant)"
                )
            networks.append(n)
        if not networks:
            raise ValueError("trusted_proxies is empty: no request could ever be trusted")
        self.networks: tuple[_Network, ...] = tuple(networks)
        if not allow_forwarded_ips:
            _refuse_forwarded_allow_ips()

    def trusts(self, peer: str | None) -> bool:
        if not peer:
            return False
        try:
            ip = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in n for n in self.networks)

    def caller(self, peer: str | None, headers: Mapping[str, str]) -> Caller:
        """``headers``: Starlette's ``request.headers`` (or any case-insensitive mapping with
        ``getlist``; a plain mapping with lower-case names cannot show duplicates)."""
        if not self.trusts(peer):
            # Identity headers from anyone else are a forgery or a misconfiguration.
            forged = [h for h in self.HEADERS if h in headers]
            log.warning("refused a request from %s: not a sidecar address (identity headers: %s)", peer, forged)
            raise Denial.missing_credential("not_from_sidecar")
        values: dict[str, str] = {}
        getlist = getattr(headers, "getlist", None)
        for h in self.HEADERS:
            got = getlist(h) if getlist is not None else ([headers[h]] if h in headers else [])
            if len(got) > 1:
                log.warning("refused a request from %s: %s appears %d times", peer, h, len(got))
                raise Denial.missing_credential("duplicate_identity_header")
            if got:
                values[h] = got[0]
        service_id = values.get("x-permiso-service-id")
        if not service_id:
            # The sidecar forwarded it without identity (a public route there).
            raise Denial.missing_credential("no_identity_headers")
        trusted = values.get("x-permiso-trusted", "false")
        if trusted not in ("true", "false"):
            raise Denial.missing_credential("malformed_identity_header")
        raw_scopes = values.get("x-permiso-scopes", "")
        scopes = tuple(raw_scopes.split(" ")) if raw_scopes else ()
        try:
            for s in scopes:
                _scopes.validate(s)
        except ValueError:
            raise Denial.missing_credential("malformed_identity_header") from None
        return Caller(
            service_id=service_id,
            service_name=values.get("x-permiso-service-name"),
            scopes=scopes,
            key_id=values.get("x-permiso-key-id"),
            token_id=values.get("x-permiso-token-id"),
            environment=values.get("x-permiso-environment"),
            trusted=trusted == "true",
            client_cert_identity=values.get("x-permiso-client-cert-identity"),
            via="sidecar",
        )


def _refuse_forwarded_allow_ips() -> None:
    """uvicorn (and gunicorn with uvicorn workers) rewrite the peer from ``X-Forwarded-For``
    for the addresses in ``--forwarded-allow-ips``; with those widened a direct caller could
    name a sidecar address as its own. Refuse to run that way. Seen: the command line,
    ``FORWARDED_ALLOW_IPS`` (uvicorn and gunicorn), ``UVICORN_FORWARDED_ALLOW_IPS`` (uvicorn's
    own environment prefix) and ``GUNICORN_CMD_ARGS``. Not seen: a gunicorn config file or
    ``uvicorn.run(forwarded_allow_ips=...)`` in code."""
    set_by = [v for v in ("FORWARDED_ALLOW_IPS", "UVICORN_FORWARDED_ALLOW_IPS") if os.environ.get(v)]
    if "forwarded-allow-ips" in os.environ.get("GUNICORN_CMD_ARGS", ""):
        set_by.append("GUNICORN_CMD_ARGS --forwarded-allow-ips")
    if any(a == "--forwarded-allow-ips" or a.startswith("--forwarded-allow-ips=") for a in sys.argv):
        set_by.append("--forwarded-allow-ips")
    if set_by:
        raise ValueError(
            f"{', '.join(set_by)} is set: the ASGI server may take the peer address from "
            "X-Forwarded-For, which a caller can write. Serve with proxy headers off "
            "(uvicorn --no-proxy-headers) and unset it, or pass allow_forwarded_ips=True if "
            "the server is only reachable through the sidecar."
        )


# Standalone: local JWT verification.


def _b64url(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _ed25519(jwk: Mapping[str, Any]) -> Ed25519PublicKey | None:
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        return None
    if jwk.get("alg", ALGORITHM) != ALGORITHM or jwk.get("use", "sig") != "sig":
        return None
    try:
        raw = _b64url(str(jwk.get("x", "")))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 32:
        return None
    return Ed25519PublicKey.from_public_bytes(raw)


def looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


#: An API key: ``svc_live_``/``svc_test_``, 43 base64url characters, a 6-character checksum.
_API_KEY = re.compile(r"svc_(?:live|test)_[A-Za-z0-9_-]{49}\Z")
#: Compact JWS: three base64url parts; Permiso's tokens are far below this size.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\Z")
MAX_TOKEN_LEN = 8192


def looks_like_permiso_credential(token: str) -> bool:
    """Whether ``token`` has the shape of a Permiso access token or API key (nothing else is
    worth a round trip to the admin plane)."""
    if len(token) > MAX_TOKEN_LEN:
        return False
    return bool(_API_KEY.match(token) or _JWT.match(token))


class JwtVerifier:
    """Verifies Permiso access tokens (RFC 9068) locally, as the sidecar does.

    Accepted only: ``alg`` EdDSA (never ``none``, never HMAC), ``typ`` ``at+jwt``, a ``kid``
    published in the JWKS, a good signature, ``iss == issuer``, ``aud`` naming ``audience``,
    ``exp``/``nbf`` within ``leeway`` seconds of ``clock()``.

    The key set is fetched on first use and kept for ``jwks_ttl`` seconds; a token naming a
    ``kid`` not in it triggers a refetch, at most once per ``refetch_interval`` seconds (so
    invented kids cannot make it hammer the admin plane). Permiso publishes a rotated-in key
    ``signing_key_publish_delay_seconds`` (300) before it signs with it.

    A certificate-bound token (``cnf``, RFC 8705) is refused: this verifier cannot see the
    client certificate; put such callers behind a sidecar.
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        *,
        leeway: float = 30.0,
        jwks_ttl: float = 300.0,
        refetch_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
        http_client: httpx.AsyncClient | None = None,
        timeout: float = 5.0,
        verify: VerifyTypes = True,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks_url = jwks_url or f"{issuer.rstrip('/')}/.well-known/jwks.json"
        self.leeway = leeway
        self.jwks_ttl = jwks_ttl
        self.refetch_interval = refetch_interval
        self.clock = clock
        self._http = http_client
        self._timeout = timeout
        self._verify = _ssl_context(verify, None)
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._tried_at: float | None = None  # last attempt
        # The fetch under way, if any: every request that needs it awaits this one.
        self._fetching: asyncio.Future[None] | None = None
        #: How many times the key set was fetched (for metrics and tests).
        self.fetches = 0

    async def verify(self, token: str) -> Caller:
        return self._caller(await self.signed_claims(token))

    async def signed_claims(self, token: str) -> dict[str, Any]:
        """The claims of a token whose header and signature pass (alg, typ, a published kid);
        nothing about the claims is judged yet."""
        if not looks_like_jwt(token):
            raise Denial.invalid_token("not_a_jwt")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Denial.invalid_token("jwt_malformed") from None
        if header.get("alg") != ALGORITHM:
            raise Denial.invalid_token("jwt_algorithm_not_allowed")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _TYPES:
            raise Denial.invalid_token("jwt_wrong_typ")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Denial.invalid_token("jwt_missing_kid")
        key = await self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                # Claims are judged below, on the injected clock.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "require": [],
                },
            )
        except jwt.InvalidSignatureError:
            raise Denial.invalid_token("jwt_bad_signature") from None
        except jwt.PyJWTError:
            raise Denial.invalid_token("jwt_malformed") from None
        return dict(claims)

    def _caller(self, c: Mapping[str, Any]) -> Caller:
        if c.get("iss") != self.issuer:
            raise Denial.invalid_token("jwt_wrong_issuer")
        aud = c.get("aud")
        if not (aud == self.audience or (isinstance(aud, list) and self.audience in aud)):
            raise Denial.invalid_token("jwt_wrong_audience")
        exp, nbf = c.get("exp"), c.get("nbf")
        if not isinstance(exp, (int, float)) or (nbf is not None and not isinstance(nbf, (int, float))):
            raise Denial.invalid_token("jwt_malformed")
        now = self.clock()
        if now >= exp + self.leeway:
            raise Denial.invalid_token("jwt_expired")
        if nbf is not None and now < nbf - self.leeway:
            raise Denial.invalid_token("jwt_not_yet_valid")
        # RFC 9068 §2.2: every one of these is required (Permiso always writes them).
        client_id, scope, jti, sub, iat = (c.get(k) for k in ("client_id", "scope", "jti", "sub", "iat"))
        if not (
            isinstance(client_id, str)
            and client_id
            and isinstance(jti, str)
            and jti
            and isinstance(sub, str)
            and sub
            and isinstance(scope, str)
        ):
            raise Denial.invalid_token("jwt_missing_claims")
        if not isinstance(iat, (int, float)) or nbf is None:
            raise Denial.invalid_token("jwt_missing_claims")
        if c.get("cnf") is not None:
            raise Denial.invalid_token("certificate_bound_token")
        return Caller(
            service_id=client_id,
            scopes=tuple(scope.split()),
            trusted=c.get("is_trusted") is True,
            token_id=jti,
            via="jwt",
            claims=dict(c),
        )

    # The key set.

    async def _key(self, kid: str) -> Ed25519PublicKey:
        now = self.clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self.jwks_ttl
        # A new fetch at most once per refetch_interval (invented kids, or an admin plane that
        # is down, must not turn into a flood); a fetch under way is joined, never repeated.
        may_start = self._fetching is None and (self._tried_at is None or now - self._tried_at >= self.refetch_interval)
        if kid not in self._keys:
            if may_start:
                self._start_fetch()
            if self._fetching is not None:
                # Shielded: a request that goes away does not cancel the fetch for the others.
                await asyncio.shield(self._fetching)
        elif stale and may_start:
            # The key is known: answer with it now and renew the set in the background, so
            # no request waits on the admin plane (nor on its timeout when it is down).
            self._start_fetch()
        key = self._keys.get(kid)
        if key is None:
            if self._fetched_at is None:
                raise Denial.unavailable("jwks_unavailable")
            raise Denial.invalid_token("jwt_unknown_kid")
        return key

    def _start_fetch(self) -> None:
        self._tried_at = self.clock()
        task = asyncio.ensure_future(self._refresh())
        self._fetching = task
        task.add_done_callback(self._fetch_done)

    def _fetch_done(self, task: asyncio.Future[None]) -> None:
        self._fetching = None
        if not task.cancelled() and task.exception() is not None:
            log.error("JWKS refresh failed: %r", task.exception())

    async def _refresh(self) -> None:
        try:
            keys = await self._fetch()
        except (httpx.HTTPError, ValueError) as e:
            log.error("JWKS fetch from %s failed: %r (keeping %d keys)", self.jwks_url, e, len(self._keys))
            return
        self._keys, self._fetched_at = keys, self.clock()
        log.info("JWKS fetched from %s: %d keys", self.jwks_url, len(keys))

    async def _fetch(self) -> dict[str, Ed25519PublicKey]:
        self.fetches += 1
        if self._http is not None:
            r = await self._http.get(self.jwks_url)
        else:
            async with httpx.AsyncClient(timeout=self._timeout, verify=self._verify) as http:
                r = await http.get(self.jwks_url)
        r.raise_for_status()
        doc = r.json()
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, list):
            raise ValueError('JWKS document has no "keys" list')
        out: dict[str, Ed25519PublicKey] = {}
        for jwk in keys:
            if isinstance(jwk, dict) and isinstance(jwk.get("kid"), str):
                key = _ed25519(jwk)
                if key is not None:
                    out[jwk["kid"]] = key
        return out


# Standalone: RFC 7662 introspection.


def _expiry(claims: Mapping[str, Any]) -> float | None:
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


class Introspector:
    """Asks the admin plane's ``/oauth/introspect`` whether a token (a JWT or an API key) is
    active, and caches the answer for ``cache_ttl`` seconds.

    Credentials, one of: ``client_id`` + ``client_secret`` (the resource server's own OAuth2
    client; ``auth_method`` basic or post), ``api_key`` (a service key, sent as Bearer), or
    ``admin_key``. Permiso answers ``{"active": false}`` for another service's token unless
    that credential's service holds ``token:introspect``: give it that scope.

    Cache semantics: an answer, active or not, is reused for ``cache_ttl`` seconds from when it
    was received (never past the token's ``exp``). A token revoked meanwhile is therefore still
    accepted until its cached answer is ``cache_ttl`` old, and refused from then on: revocation
    takes effect within ``cache_ttl``. ``cache_ttl=0`` asks on every request.

    If the admin plane cannot answer (down, 5xx, our credentials refused), the request is
    refused with 503 ``temporarily_unavailable`` (fail closed).

    What is never sent to the admin plane: a credential that has neither the shape of a
    Permiso JWT nor of an API key (401 at once), a JWT whose header or signature fails against
    the admin plane's published keys (``prefilter=True``; ``jwks_url`` defaults to the
    introspection URL's ``/.well-known/jwks.json``; when the key set cannot be fetched the
    admin plane judges alone), and more than ``max_inflight`` distinct
    introspections at a time (503 beyond that), so a flood of invented tokens costs the admin
    plane a bounded number of requests. A certificate-bound token (``cnf``, RFC 8705) is
    refused: this process cannot see the caller's certificate.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        auth_method: str = "client_secret_basic",
        api_key: str | None = None,
        admin_key: str | None = None,
        audience: str | None = None,
        cache_ttl: float = 10.0,
        cache_size: int = 10_000,
        negative_cache_size: int = 1_000,
        max_inflight: int = 64,
        prefilter: bool = True,
        jwks_url: str | None = None,
        clock: Callable[[], float] = time.time,
        http_client: httpx.AsyncClient | None = None,
        timeout: float = 5.0,
        verify: VerifyTypes = True,
    ) -> None:
        given = [bool(client_id and client_secret), bool(api_key), bool(admin_key)]
        if sum(given) != 1:
            raise ValueError("give exactly one credential: client_id + client_secret, api_key or admin_key")
        if auth_method not in ("client_secret_basic", "client_secret_post"):
            raise ValueError(f"unknown auth_method {auth_method!r}")
        self.url = url
        self.audience = audience
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.negative_cache_size = negative_cache_size
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.max_inflight = max_inflight
        # JWTs are checked against the published keys before a round trip: a forged or
        # invented token costs no introspection and takes no in-flight slot.
        self._prefilter: JwtVerifier | None = None
        base = url[: -len("/oauth/introspect")] if url.endswith("/oauth/introspect") else None
        if prefilter and (jwks_url or base):
            self._prefilter = JwtVerifier(
                base or "",
                audience or "",
                jwks_url,
                clock=clock,
                http_client=http_client,
                timeout=timeout,
                verify=verify,
            )
        self.clock = clock
        self._headers: dict[str, str] = {"Accept": "application/json"}
        self._form: dict[str, str] = {}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        elif admin_key:
            self._headers["X-Admin-Api-Key"] = admin_key
        elif auth_method == "client_secret_post":
            self._form = {"client_id": client_id or "", "client_secret": client_secret or ""}
        else:
            # RFC 6749 §2.3.1: each part form-urlencoded, then base64.
            raw = f"{quote_plus(client_id or '', safe='')}:{quote_plus(client_secret or '', safe='')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
        self._http = http_client
        # One client per event loop, forgotten with its loop.
        self._own: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()
        self._timeout = timeout
        self._verify = _ssl_context(verify, None)
        # Active answers (received at, caller, exp) and inactive ones (received at) apart, so
        # a flood of invented tokens cannot push the real callers' answers out.
        self._cache: OrderedDict[bytes, tuple[float, Caller, float | None]] = OrderedDict()
        self._negative: OrderedDict[bytes, float] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Caller | None]] = {}  # one event loop
        #: How many introspection requests were sent (for metrics and tests).
        self.requests = 0

    async def verify(self, token: str) -> Caller:
        if not looks_like_permiso_credential(token):
            raise Denial.invalid_token("not_a_permiso_credential")
        key = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        hit = self._cache.get(key)
        miss = self._negative.get(key)
        if hit is not None and now - hit[0] < self.cache_ttl:
            _, caller, exp = hit
        elif hit is None and miss is not None and now - miss < self.cache_ttl:
            raise Denial.invalid_token("inactive")
        else:
            await self._prefiltered(token)
            got = await self._introspect_once(key, token)
            if got is None:
                raise Denial.invalid_token("inactive")
            caller, exp = got, _expiry(got.claims)
        # The expiry is the one read when the answer came, not the (shared) claims now.
        if exp is not None and self.clock() >= exp:
            raise Denial.invalid_token("expired")
        # Each request its own claims: what one handler changes, no other request sees.
        return dataclasses.replace(caller, claims=dict(caller.claims))

    async def _prefiltered(self, token: str) -> None:
        if self._prefilter is None or not looks_like_jwt(token):
            return
        try:
            await self._prefilter.signed_claims(token)
        except Denial as d:
            if d.status == 503:
                return  # the key set cannot be had now: the admin plane judges alone
            raise Denial.invalid_token(d.reason) from None

    def forget(self, token: str | None = None) -> None:
        """Drop one token's cached answer, or all of them."""
        if token is None:
            self._cache.clear()
            self._negative.clear()
        else:
            key = hashlib.sha256(token.encode()).digest()
            self._cache.pop(key, None)
            self._negative.pop(key, None)

    async def _introspect_once(self, key: bytes, token: str) -> Caller | None:
        # Concurrent requests with the same uncached token share one introspection, run as a
        # task of its own so that a request going away does not cancel it for the others.
        task = self._inflight.get(key)
        if task is None:
            if len(self._inflight) >= self.max_inflight:
                log.warning("introspection refused: %d already in flight", len(self._inflight))
                raise Denial.unavailable("introspection_busy")
            task = asyncio.ensure_future(self._introspect(token))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        try:
            return await asyncio.shield(task)
        except Denial as d:
            raise d.copy() from None  # each waiter its own exception object

    def _done(self, key: bytes, task: asyncio.Future[Caller | None]) -> None:
        self._inflight.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return  # nothing cached: the next request asks again
        caller, now = task.result(), self.clock()
        if caller is None:
            self._cache.pop(key, None)
            self._negative[key] = now
            self._negative.move_to_end(key)
            while len(self._negative) > self.negative_cache_size:
                self._negative.popitem(last=False)
        else:
            self._negative.pop(key, None)
            self._cache[key] = (now, caller, _expiry(caller.claims))
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _client(self) -> httpx.AsyncClient:
        if self._http is not None:
            return self._http
        loop = asyncio.get_running_loop()
        client = self._own.get(loop)
        if client is None:
            client = self._own[loop] = httpx.AsyncClient(timeout=self._timeout, verify=self._verify)
        return client

    async def _introspect(self, token: str) -> Caller | None:
        self.requests += 1
        try:
            r = await self._client().post(self.url, data={"token": token, **self._form}, headers=self._headers)
        except httpx.HTTPError as e:
            log.error("introspection at %s failed: %r", self.url, e)
            raise Denial.unavailable("introspection_unreachable") from None
        if r.status_code != 200:
            log.error("introspection at %s answered %d: %s", self.url, r.status_code, r.text[:200])
            raise Denial.unavailable(f"introspection_status_{r.status_code}")
        try:
            body = r.json()
        except ValueError:
            raise Denial.unavailable("introspection_not_json") from None
        if not isinstance(body, dict) or body.get("active") is not True:
            return None
        if str(body.get("token_type", "Bearer")).lower() != "bearer":
            return None
        if self.audience is not None:
            aud = body.get("aud")
            if not (aud == self.audience or (isinstance(aud, list) and self.audience in aud)):
                log.info("introspected token for another audience (%r)", aud)
                return None
        if body.get("cnf") is not None:
            log.info("introspected a certificate-bound token: refused (no client certificate here)")
            return None
        client_id = body.get("client_id") or body.get("sub")
        if not isinstance(client_id, str):
            return None
        scope = body.get("scope") or ""
        jti = body.get("jti")
        return Caller(
            service_id=client_id,
            scopes=tuple(str(scope).split()),
            trusted=body.get("is_trusted") is True,
            token_id=jti if isinstance(jti, str) else None,
            via="introspection",
            claims=body,
        )

    async def aclose(self) -> None:
        for client in list(self._own.values()):
            await client.aclose()
        self._own.clear()
