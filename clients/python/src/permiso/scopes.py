"""Scope syntax and matching, exactly as Permiso's sidecar applies them.

A scope is ``segment(:segment)*`` of ``[A-Za-z0-9_.-]``; the last segment may be ``*``, which
grants every scope strictly below its stem (``trade:*`` grants ``trade:open`` and
``trade:x:y``, not ``trade``). Matching is otherwise exact and case-sensitive; ``admin:*`` is a
scope like any other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MAX_SCOPE_LEN", "grants", "allows", "missing", "validate"]

MAX_SCOPE_LEN = 128
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+\Z")


def validate(scope: str) -> str:
    """Return ``scope`` if it is well formed, else raise :class:`ValueError`."""
    if not 1 <= len(scope) <= MAX_SCOPE_LEN:
        raise ValueError(f"scope must be 1 to {MAX_SCOPE_LEN} characters: {scope!r}")
    segments = scope.split(":")
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        ok = (i == last and i > 0) if seg == "*" else bool(_SEGMENT.match(seg))
        if not ok:
            raise ValueError(
                f"scope {scope!r} must be segments of [A-Za-z0-9_.-] separated by ':', "
                "with '*' only as the whole last segment"
            )
    return scope


def grants(held: str, needed: str) -> bool:
    """Whether holding the scope ``held`` grants ``needed``."""
    if held == needed:
        return True
    if held.endswith(":*"):
        stem = held[:-1]  # ends with ':'
        return len(needed) > len(stem) and needed.startswith(stem)
    return False


def allows(held: Iterable[str], needed: str) -> bool:
    """Whether any of the ``held`` scopes grants ``needed``."""
    return any(grants(h, needed) for h in held)


def missing(held: Iterable[str], needed: Iterable[str]) -> list[str]:
    """The scopes of ``needed`` that ``held`` does not grant, in order."""
    held = list(held)
    return [n for n in needed if not allows(held, n)]
