"""Rules of the auth service: users, password policy, access-token claims, refresh-token families.

No I/O here. Refresh tokens rotate: each use spends the token and issues its successor in
the same family (one family per login). Presenting a spent token means it was copied, so
the whole family is revoked, the thief's copy and the owner's newest token alike.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

__all__ = [
    "ADMIN",
    "CUSTOMER",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "AuthError",
    "BadCredentials",
    "EmailTaken",
    "InvalidRefreshToken",
    "IssuedRefreshToken",
    "RefreshToken",
    "RefreshVerdict",
    "TooManyAttempts",
    "User",
    "access_claims",
    "hash_refresh_token",
    "issue_refresh_token",
    "judge_refresh",
    "name_problem",
    "new_user_id",
    "normalise_email",
    "password_problem",
    "spend",
    "with_role",
]

CUSTOMER = "customer"
ADMIN = "admin"
MIN_PASSWORD_LENGTH = 8
# argon2 costs the same for any length, but a megabyte "password" is not one.
MAX_PASSWORD_LENGTH = 256


class AuthError(Exception):
    """A use case refused; the API turns each kind into its status code."""


class EmailTaken(AuthError):
    pass


class BadCredentials(AuthError):
    pass


class InvalidRefreshToken(AuthError):
    pass


class UnknownService(AuthError):
    """The service is not in the client table, or its secret did not match."""


class TooManyAttempts(AuthError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed attempts; retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class User:
    id: str
    name: str
    email: str
    roles: tuple[str, ...] = (CUSTOMER,)


def new_user_id() -> str:
    return str(uuid.uuid4())


def normalise_email(email: str) -> str:
    return email.strip().lower()


def password_problem(password: str) -> str | None:
    """Why ``password`` is not acceptable, or None if it is."""
    if not _is_text(password):
        return "must be valid text"
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"must be at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"must be at most {MAX_PASSWORD_LENGTH} characters"
    if not password.strip():
        return "must not be blank"
    return None


# Explicit embeddings, overrides and isolates: text that displays in another order than it
# reads ("Trojan Source"), so a name could pass for someone else's in an admin's list.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def name_problem(name: str) -> str | None:
    """Why a user's display name is refused, or None."""
    if not name.strip():
        return "must not be blank"
    if not name.isprintable() and any(
        unicodedata.category(c) in {"Cc", "Cs"} or c in _BIDI_CONTROLS for c in name
    ):
        return "must be text without control or bidirectional-override characters"
    return None


def _is_text(value: str) -> bool:
    # JSON may spell a lone surrogate (\ud800); it has no UTF-8 bytes, so nothing to hash.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def with_role(roles: Iterable[str], role: str) -> tuple[str, ...]:
    current = tuple(roles)
    return current if role in current else (*current, role)


def access_claims(
    user: User,
    *,
    issuer: str,
    audience: str,
    issued_at: datetime,
    ttl: timedelta,
    token_id: str,
) -> dict[str, Any]:
    return {
        "sub": user.id,
        "email": user.email,
        "roles": list(user.roles),
        "iss": issuer,
        "aud": audience,
        "iat": int(issued_at.timestamp()),
        "exp": int((issued_at + ttl).timestamp()),
        "jti": token_id,
    }


SERVICE_NAME_RE = r"^[a-z][a-z0-9-]{0,62}$"
# The base URL of the one instance a service token is for, as the registry lists it:
# scheme, host (a name, an IPv4 address or a bracketed IPv6 one) and port, nothing more.
SERVICE_TARGET_RE = r"^https?://(?:[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}$"


def service_claims(
    service: str,
    *,
    target: str,
    issuer: str,
    audience: str,
    issued_at: datetime,
    ttl: timedelta,
    token_id: str,
) -> dict[str, Any]:
    """A service's own identity for internal calls: role ``service``, never a user's roles;
    ``audience`` is the internal one, so no user route takes it; ``target`` is the instance
    it may be used at, so whoever receives it cannot replay it at another."""
    return {
        "sub": f"service:{service}",
        "target": target,
        "email": "",
        "roles": ["service"],
        "iss": issuer,
        "aud": audience,
        "iat": int(issued_at.timestamp()),
        "exp": int((issued_at + ttl).timestamp()),
        "jti": token_id,
    }


def hash_refresh_token(secret: str) -> str:
    """Only this digest is stored: a leaked table holds no usable token.

    The secret is 256 random bits, so a fast unsalted hash is enough (no guessing to slow).
    """
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RefreshToken:
    token_hash: str
    family_id: str
    user_id: str
    issued_at: datetime
    expires_at: datetime
    spent_at: datetime | None = None
    family_revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IssuedRefreshToken:
    """The secret goes to the client once; only ``record`` is kept."""

    secret: str
    record: RefreshToken


def issue_refresh_token(
    *, user_id: str, now: datetime, ttl: timedelta, family_id: str | None = None
) -> IssuedRefreshToken:
    """The first token of a new family (a login), or the successor in ``family_id``."""
    secret = secrets.token_urlsafe(32)
    record = RefreshToken(
        token_hash=hash_refresh_token(secret),
        family_id=family_id or str(uuid.uuid4()),
        user_id=user_id,
        issued_at=now,
        expires_at=now + ttl,
    )
    return IssuedRefreshToken(secret=secret, record=record)


class RefreshVerdict(enum.Enum):
    USABLE = "usable"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    REUSED = "reused"
    EXPIRED = "expired"

    @property
    def revokes_family(self) -> bool:
        return self is RefreshVerdict.REUSED


def judge_refresh(token: RefreshToken | None, *, now: datetime) -> RefreshVerdict:
    if token is None:
        return RefreshVerdict.UNKNOWN
    if token.family_revoked_at is not None:
        return RefreshVerdict.REVOKED
    # Spent wins over expired: a replayed token still betrays a copy, whose family may live on.
    if token.spent_at is not None:
        return RefreshVerdict.REUSED
    if token.expires_at <= now:
        return RefreshVerdict.EXPIRED
    return RefreshVerdict.USABLE


def spend(token: RefreshToken, *, now: datetime) -> RefreshToken:
    return replace(token, spent_at=now)
