"""Who called (:class:`Caller`) and how a refusal is answered (:class:`Denial`).

Both are framework-free: :mod:`permiso.fastapi` turns a :class:`Denial` into the HTTP answer,
which is byte for byte the one the Permiso sidecar gives (RFC 6750 §3).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import scopes as _scopes

__all__ = ["Caller", "Denial", "Via"]

Via = Literal["sidecar", "jwt", "introspection"]

_REALM = 'Bearer realm="permiso"'
_INVALID = "The access token is invalid, expired or revoked"


@dataclass(frozen=True)
class Caller:
    """The authenticated calling service, whichever way it was established.

    ``service_id`` is also the OAuth2 ``client_id`` (:attr:`client_id`). ``key_id`` is set for
    an API key, ``token_id`` (the ``jti``) for an access token. Fields Permiso does not carry
    in a given mode are ``None``: a JWT or an introspection answer names no service name or
    environment, and introspection names no key id.
    """

    service_id: str
    scopes: tuple[str, ...] = ()
    trusted: bool = False
    service_name: str | None = None
    key_id: str | None = None
    token_id: str | None = None
    environment: str | None = None
    client_cert_identity: str | None = None
    via: Via = "sidecar"
    #: The verified JWT claims or the introspection answer (empty behind a sidecar).
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def client_id(self) -> str:
        return self.service_id

    def has_scope(self, needed: str) -> bool:
        """Whether the caller's scopes grant ``needed`` (``*`` wildcards as the sidecar)."""
        return _scopes.allows(self.scopes, needed)

    def missing_scopes(self, *needed: str) -> list[str]:
        return _scopes.missing(self.scopes, needed)


class Denial(Exception):
    """A refusal with the sidecar's status, headers and JSON body.

    Use the constructors (:meth:`missing_credential`, :meth:`invalid_token`,
    :meth:`insufficient_scope`, :meth:`not_trusted`, :meth:`unavailable`); ``reason`` is for
    logs only and never sent.
    """

    def __init__(
        self,
        status: int,
        error: str,
        description: str,
        headers: Mapping[str, str] | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(f"{status} {error}: {reason or description}")
        self.status = status
        self.error = error
        self.description = description
        self.headers: dict[str, str] = dict(headers or {})
        self.reason = reason or error

    def copy(self) -> Denial:
        """The same refusal as a new exception (to raise in another task or thread)."""
        return Denial(self.status, self.error, self.description, self.headers, self.reason)

    @property
    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()

    def response_headers(self) -> dict[str, str]:
        """Every header of the answer but Content-Length."""
        return {"Content-Type": "application/json", "Cache-Control": "no-store", **self.headers}

    # The sidecar's answers (crates/core/src/denial.rs).

    @classmethod
    def missing_credential(cls, reason: str = "missing_credential") -> Denial:
        """401 without an error code (RFC 6750 §3.1): no credential was presented."""
        return cls(401, "unauthorized", "A Bearer credential is required", {"WWW-Authenticate": _REALM}, reason)

    @classmethod
    def invalid_token(cls, reason: str = "invalid_token") -> Denial:
        """401 ``invalid_token``; every reason looks the same to the caller."""
        return cls(
            401,
            "invalid_token",
            _INVALID,
            {"WWW-Authenticate": f'{_REALM}, error="invalid_token", error_description="{_INVALID}"'},
            reason,
        )

    @classmethod
    def insufficient_scope(cls, required: str) -> Denial:
        """403 naming every scope the route requires (space separated)."""
        return cls(
            403,
            "insufficient_scope",
            f"This route requires the scope(s): {required}",
            {"WWW-Authenticate": f'{_REALM}, error="insufficient_scope", scope="{required}"'},
            "insufficient_scope",
        )

    @classmethod
    def not_trusted(cls) -> Denial:
        return cls(403, "access_denied", "This route requires a trusted service client", None, "not_trusted")

    @classmethod
    def bad_request(cls, reason: str) -> Denial:
        return cls(400, "invalid_request", "The request is malformed", None, reason)

    @classmethod
    def unavailable(cls, reason: str) -> Denial:
        """503: the credential could not be checked now (fail closed)."""
        return cls(
            503,
            "temporarily_unavailable",
            "The credential cannot be checked now; try again shortly",
            {"Retry-After": "1"},
            reason,
        )
