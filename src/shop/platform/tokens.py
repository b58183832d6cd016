"""Access-token verification against the auth service's JWKS.

Keys are parsed once and cached by ``kid``; an unknown ``kid`` triggers one refetch
(rate-limited, so a flood of forged kids cannot hammer the auth service). The
algorithm is pinned to the asymmetric one: ``none`` and HS256 are refused.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

__all__ = [
    "ALGORITHMS",
    "InvalidToken",
    "JwksVerifier",
    "KeysUnavailable",
    "Principal",
    "principal_from_claims",
]

ALGORITHMS = ("RS256",)
REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud", "jti"]


class InvalidToken(Exception):
    """The token is missing, malformed, expired, or not signed by a key we trust."""


class KeysUnavailable(Exception):
    """The token names a key we do not hold and the JWKS source cannot be reached.

    Not an ``InvalidToken``: the caller's token may be fine, so the honest answer is 503.
    """


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    email: str
    roles: frozenset[str]
    token_id: str

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise InvalidToken("roles claim is malformed")
    return Principal(
        user_id=str(claims["sub"]),
        email=str(claims.get("email", "")),
        roles=frozenset(roles),
        token_id=str(claims["jti"]),
    )


def decode(
    token: str, *, key: Any, issuer: str, audience: str, leeway_s: float = 5.0
) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=list(ALGORITHMS),
            audience=audience,
            issuer=issuer,
            leeway=leeway_s,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    return claims


class JwksVerifier:
    def __init__(
        self,
        *,
        fetch_jwks: Callable[[], Awaitable[Mapping[str, Any]]],
        issuer: str,
        audience: str,
        min_refetch_interval_s: float = 10.0,
        cache_size: int = 10_000,
        leeway_s: float = 5.0,
    ) -> None:
        self._leeway = leeway_s
        self._fetch = fetch_jwks
        self._issuer = issuer
        self._audience = audience
        self._min_refetch = min_refetch_interval_s
        self._keys: dict[str, Any] = {}
        self._last_fetch = float("-inf")
        self._last_fetch_failed = False
        self._lock = asyncio.Lock()
        # Verified tokens until they expire: a client sends the same token many times, and
        # parsing one costs ~130 µs of pure-Python base64 checks in PyJWT (bench/).
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._verified_max = cache_size

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._last_fetch < self._min_refetch:
                return
            self._last_fetch = time.monotonic()
            self._last_fetch_failed = True
            jwks = await self._fetch()
            keys: dict[str, Any] = {}
            for raw in jwks.get("keys", []):
                if raw.get("kty") != "RSA" or raw.get("use", "sig") != "sig" or "kid" not in raw:
                    continue
                keys[raw["kid"]] = jwt.PyJWK(raw, algorithm="RS256").key
            self._keys = keys
            self._last_fetch_failed = False

    async def key_for(self, kid: str) -> Any:
        if kid not in self._keys:
            try:
                await self._refresh()
            except Exception as exc:  # whatever the JWKS source failed with
                raise KeysUnavailable("signing keys cannot be fetched") from exc
        key = self._keys.get(kid)
        if key is None:
            if self._last_fetch_failed:
                # Inside the refetch interval after a failed fetch: we cannot tell.
                raise KeysUnavailable("signing keys cannot be fetched")
            raise InvalidToken("unknown signing key")
        return key

    async def verify(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires_at = cached
            if time.time() < expires_at + self._leeway:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("malformed token") from exc
        if header.get("alg") not in ALGORITHMS:
            raise InvalidToken("algorithm not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("token has no key id")
        key = await self.key_for(kid)
        claims = decode(
            token, key=key, issuer=self._issuer, audience=self._audience, leeway_s=self._leeway
        )
        principal = principal_from_claims(claims)
        self._verified[token] = (principal, float(claims["exp"]))
        if len(self._verified) > self._verified_max:
            self._verified.popitem(last=False)
        return principal
