"""Access-token verification against the auth service's JWKS.

Keys are parsed once and cached by ``kid``; an unknown ``kid`` triggers one refetch
(rate-limited, so a flood of forged kids cannot hammer the auth service). The key set is
held no longer than the JWKS's own ``Cache-Control: max-age``: a key auth stops publishing
stops being trusted within that time, and so do the verified tokens it signed. The
algorithm is pinned to the asymmetric one: ``none`` and HS256 are refused.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

__all__ = [
    "ALGORITHMS",
    "DEFAULT_JWKS_MAX_AGE_S",
    "SERVICE_SUBJECT_PREFIX",
    "FetchedJwks",
    "InvalidToken",
    "Jwks",
    "JwksVerifier",
    "KeysUnavailable",
    "Principal",
    "principal_from_claims",
]

ALGORITHMS = ("RS256",)
# A JWKS answer without max-age is kept this long; one with a longer max-age no longer than
# MAX_JWKS_AGE_S, so a key removed from the JWKS is dropped within minutes whatever it says.
DEFAULT_JWKS_MAX_AGE_S = 300.0
MAX_JWKS_AGE_S = 3600.0
SERVICE_SUBJECT_PREFIX = "service:"
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
    # Who the token is for: users' tokens name the public audience, service tokens the
    # internal one; routes check it (platform/security.py).
    audience: str = ""
    # A service token names the one instance it may be used at (its base URL, as the
    # registry lists it): a peer that received it cannot replay it at another instance.
    target: str = ""

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def service_name(self) -> str | None:
        """The calling service's name for a service token (``sub`` = ``service:<name>``)."""
        if self.user_id.startswith(SERVICE_SUBJECT_PREFIX):
            return self.user_id.removeprefix(SERVICE_SUBJECT_PREFIX)
        return None


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise InvalidToken("roles claim is malformed")
    audience = claims.get("aud", "")
    if isinstance(audience, list):
        # Ours name one audience; a list of several cannot say which one it is for.
        if len(audience) != 1:
            raise InvalidToken("the token names more than one audience")
        audience = audience[0]
    target = claims.get("target", "")
    if not isinstance(target, str):
        raise InvalidToken("target claim is malformed")
    return Principal(
        user_id=str(claims["sub"]),
        email=str(claims.get("email", "")),
        roles=frozenset(roles),
        token_id=str(claims["jti"]),
        audience=str(audience),
        target=target,
    )


@dataclass(frozen=True, slots=True)
class Jwks:
    """A JWKS document and how long its publisher lets it be kept (``max-age``)."""

    document: Mapping[str, Any]
    max_age_s: float | None = None


# A JWKS source answers the document alone (kept DEFAULT_JWKS_MAX_AGE_S) or with its max-age.
FetchedJwks = Mapping[str, Any] | Jwks


def decode(
    token: str, *, key: Any, issuer: str, audience: str | Sequence[str], leeway_s: float = 5.0
) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=list(ALGORITHMS),
            audience=audience if isinstance(audience, str) else list(audience),
            issuer=issuer,
            leeway=leeway_s,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    return claims


class JwksVerifier:
    """Verifies access tokens with the keys of one JWKS source.

    ``audience`` is the users' audience; ``internal_audience``, when given, is accepted too
    (service tokens), and ``Principal.audience`` tells routes which one a token named.
    """

    def __init__(
        self,
        *,
        fetch_jwks: Callable[[], Awaitable[FetchedJwks]],
        issuer: str,
        audience: str,
        internal_audience: str | None = None,
        min_refetch_interval_s: float = 10.0,
        cache_size: int = 10_000,
        leeway_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._leeway = leeway_s
        self._fetch = fetch_jwks
        self._issuer = issuer
        self._audiences = [audience] if internal_audience is None else [audience, internal_audience]
        self._min_refetch = min_refetch_interval_s
        self._clock = clock
        self._keys: dict[str, Any] = {}
        self._keys_expire_at = float("-inf")
        self._last_fetch = float("-inf")
        self._last_fetch_failed = False
        self._lock = asyncio.Lock()
        # Verified tokens until they expire: a client sends the same token many times, and
        # parsing one costs ~130 µs of pure-Python base64 checks in PyJWT (bench/). Each
        # entry remembers its kid, so a key dropped from the JWKS takes its tokens with it.
        self._verified: OrderedDict[str, tuple[Principal, float, str]] = OrderedDict()
        self._verified_max = cache_size
        # The last token ``cached`` refused, and why: ``verify``, asked next for the same
        # token (the gateway hands a refused one to its ordinary path), says so without
        # parsing and checking it a second time.
        self._refused: tuple[str, str] | None = None

    async def _refresh(self) -> None:
        async with self._lock:
            if self._clock() - self._last_fetch < self._min_refetch:
                return
            self._last_fetch = self._clock()
            self._last_fetch_failed = True
            fetched = await self._fetch()
            jwks, max_age = (
                (fetched.document, fetched.max_age_s)
                if isinstance(fetched, Jwks)
                else (fetched, None)
            )
            keys: dict[str, Any] = {}
            for raw in jwks.get("keys", []):
                if raw.get("kty") != "RSA" or raw.get("use", "sig") != "sig" or "kid" not in raw:
                    continue
                keys[raw["kid"]] = jwt.PyJWK(raw, algorithm="RS256").key
            self._keys = keys
            age = DEFAULT_JWKS_MAX_AGE_S if max_age is None else max_age
            self._keys_expire_at = self._clock() + min(max(age, 0.0), MAX_JWKS_AGE_S)
            self._last_fetch_failed = False
            for token, (_, _, kid) in list(self._verified.items()):
                if kid not in keys:
                    del self._verified[token]

    async def _revalidate(self) -> None:
        """Past the JWKS's max-age: fetch it again. If auth cannot be reached the keys held
        stay in use (stale-if-error) until it can: an outage must not log everybody out,
        and only a JWKS that answers can say a key was withdrawn."""
        if self._clock() < self._keys_expire_at or self._keys_expire_at == float("-inf"):
            return
        try:
            await self._refresh()
        except Exception:  # noqa: BLE001 - whatever the JWKS source failed with; retried later
            return

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
        await self._revalidate()
        refused = self._refused
        if refused is not None and refused[0] == token:
            self._refused = None
            raise InvalidToken(refused[1])
        principal = self._remembered(token)
        if principal is not None:
            return principal
        kid = _kid_of(token)
        key = await self.key_for(kid)
        return self._check(token, key=key, kid=kid)

    def cached(self, token: str) -> Principal | None:
        """``verify`` without waiting, for callers with no task to wait in (the gateway's fast
        lane): the token's principal when it is decided with what is held now (a token
        verified before, or one signed by a key held and within the JWKS's max-age). None
        when it is not: the keys must be fetched first, or the token is refused (``verify``
        then raises the same ``InvalidToken`` without checking it again)."""
        if self._clock() >= self._keys_expire_at:
            return None  # never fetched, or past max-age: ``verify`` fetches them again
        principal = self._remembered(token)
        if principal is not None:
            return principal
        try:
            kid = _kid_of(token)
            key = self._keys.get(kid)
            if key is None:
                return None  # an unknown key id: ``verify`` refetches (or says why not)
            return self._check(token, key=key, kid=kid)
        except InvalidToken as exc:
            self._refused = (token, str(exc))
            return None

    def _remembered(self, token: str) -> Principal | None:
        """The principal of a token verified before and not expired since."""
        cached = self._verified.get(token)
        if cached is None:
            return None
        principal, expires_at, _ = cached
        if time.time() < expires_at + self._leeway:
            self._verified.move_to_end(token)
            return principal
        del self._verified[token]
        return None

    def _check(self, token: str, *, key: Any, kid: str) -> Principal:
        """Verify ``token`` with ``key`` (its ``kid``'s) and remember its principal."""
        claims = decode(
            token, key=key, issuer=self._issuer, audience=self._audiences, leeway_s=self._leeway
        )
        principal = principal_from_claims(claims)
        self._verified[token] = (principal, float(claims["exp"]), kid)
        if len(self._verified) > self._verified_max:
            self._verified.popitem(last=False)
        return principal


def _kid_of(token: str) -> str:
    """The key id a token names, once its header says an algorithm we accept."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise InvalidToken("malformed token") from exc
    if header.get("alg") not in ALGORITHMS:
        raise InvalidToken("algorithm not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise InvalidToken("token has no key id")
    return kid
