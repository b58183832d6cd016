"""Who is calling: bearer tokens checked against the auth service's JWKS.

The gateway is the first gate; every service checks the token again with these helpers
(``CurrentUser``, ``AdminUser``, ``internal_caller``), so a request that bypassed the
gateway gains nothing. The JWKS comes from the configured ``SHOP_JWKS_URL`` and service
tokens from the configured ``SHOP_AUTH_URL``: never from an address the registry gives,
since anyone who can register an ``auth-service`` could then sign tokens or collect secrets.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import aiohttp
from fastapi import Depends, Request
from pydantic import SecretStr

from shop.platform.problems import Problem
from shop.platform.settings import PlatformSettings
from shop.platform.tokens import (
    FetchedJwks,
    InvalidToken,
    Jwks,
    JwksVerifier,
    KeysUnavailable,
    Principal,
)

__all__ = [
    "JWKS_PATH",
    "SERVICE_ROLE",
    "SERVICE_TOKEN_PATH",
    "AdminUser",
    "CurrentUser",
    "InternalCallers",
    "JwksUnavailable",
    "ServiceTokenUnavailable",
    "ServiceTokens",
    "authenticate",
    "bearer_token",
    "internal_caller",
    "jwks_from_url",
    "max_age_of",
    "no_jwks_source",
    "pinned_jwks",
    "refuse_service_identity",
    "user_principal",
]

JWKS_PATH = "/auth/.well-known/jwks.json"
SERVICE_TOKEN_PATH = "/internal/service-token"  # noqa: S105 - a path, not a secret
SERVICE_ROLE = "service"
_BEARER = re.compile(r"^\s*bearer\s+([A-Za-z0-9._~+/=-]+)\s*$", re.IGNORECASE)
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,10})\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-cache|no-store)\s*(?:,|$)", re.IGNORECASE)
# The gateway's session does not decompress, so its own JSON reads ask for plain answers.
_PLAIN_JSON = {"Accept": "application/json", "Accept-Encoding": "identity"}


class JwksUnavailable(Exception):
    """The configured JWKS could not be read (unreachable, not 200, not JSON)."""


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    match = _BEARER.match(authorization)
    return match.group(1) if match else None


def max_age_of(cache_control: str | None) -> float | None:
    """Seconds a ``Cache-Control`` header lets an answer be kept; ``no-cache``/``no-store``
    mean 0; None when it does not say."""
    if not cache_control:
        return None
    if _NO_CACHE.search(cache_control):
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


def jwks_from_url(url: str, session: aiohttp.ClientSession) -> Callable[[], Awaitable[FetchedJwks]]:
    """A JWKS source: the configured JWKS URL (``SHOP_JWKS_URL``), kept as long as it says."""

    async def fetch() -> FetchedJwks:
        try:
            async with session.get(
                url,
                headers=_PLAIN_JSON,
                timeout=aiohttp.ClientTimeout(total=3.0),
                # A redirect could lead anywhere; the pinned URL is the only source.
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    raise JwksUnavailable(f"the JWKS answered {resp.status}")
                body = await resp.json(content_type=None)
                max_age = max_age_of(resp.headers.get("Cache-Control"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise JwksUnavailable(str(exc) or type(exc).__name__) from exc
        if not isinstance(body, dict):
            raise JwksUnavailable("the JWKS is not a JSON object")
        return Jwks(document=body, max_age_s=max_age)

    return fetch


def pinned_jwks(
    platform: PlatformSettings, session: aiohttp.ClientSession
) -> Callable[[], Awaitable[FetchedJwks]]:
    """The JWKS source the settings pin (``SHOP_JWKS_URL``); none when it is not set."""
    if platform.jwks_url is None:
        return no_jwks_source()
    return jwks_from_url(platform.jwks_url, session)


def no_jwks_source() -> Callable[[], Awaitable[FetchedJwks]]:
    """Where no JWKS URL is configured: every token is refused as unverifiable (503), rather
    than trusting keys from wherever the registry points."""

    async def fetch() -> FetchedJwks:
        raise JwksUnavailable("SHOP_JWKS_URL is not set")

    return fetch


async def authenticate(authorization: str | None, *, verifier: JwksVerifier) -> Principal:
    """The caller behind an ``Authorization`` header, or a 401 (503 if keys are unreachable)."""
    token = bearer_token(authorization)
    if token is None:
        raise Problem(401, "An access token is required.", headers={"WWW-Authenticate": "Bearer"})
    try:
        return await verifier.verify(token)
    except KeysUnavailable as exc:
        raise Problem(
            503,
            "The signing keys cannot be fetched right now; try again shortly.",
            headers={"Retry-After": "5"},
        ) from exc
    except InvalidToken as exc:
        reason = str(exc).replace('"', "'")
        raise Problem(
            401,
            "The access token is not valid.",
            headers={
                "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{reason}"'
            },
        ) from exc


def _audiences(request: Request) -> tuple[str, str]:
    platform = request.app.state.runtime.platform
    return str(platform.auth_audience), str(platform.internal_audience)


def refuse_service_identity(principal: Principal, *, audience: str | None = None) -> Principal:
    """A service token is nobody's login: it may call internal APIs, never act as a user."""
    if SERVICE_ROLE in principal.roles or principal.service_name is not None:
        raise Problem(403, "A service token cannot be used as a user's.")
    if audience is not None and principal.audience != audience:
        raise Problem(403, "This token is not meant for this API.")
    return principal


async def _caller(request: Request) -> Principal:
    verifier: JwksVerifier = request.app.state.runtime.tokens
    return await authenticate(request.headers.get("authorization"), verifier=verifier)


async def user_principal(
    authorization: str | None, *, verifier: JwksVerifier, audience: str
) -> Principal:
    """The user behind an ``Authorization`` header (``CurrentUser`` without FastAPI, for
    the lean routes of platform/fastpath.py): 401 without a valid token, 403 for a service
    token or one meant for another API."""
    principal = await authenticate(authorization, verifier=verifier)
    return refuse_service_identity(principal, audience=audience)


async def _current_user(request: Request) -> Principal:
    users, _ = _audiences(request)
    return refuse_service_identity(await _caller(request), audience=users)


CurrentUser = Annotated[Principal, Depends(_current_user)]


async def _admin_user(principal: CurrentUser) -> Principal:
    if not principal.is_admin:
        raise Problem(403, "This needs the admin role.")
    return principal


AdminUser = Annotated[Principal, Depends(_admin_user)]


class InternalCallers:
    """The check of ``internal_caller``: a FastAPI dependency, and ``admit`` for code that
    has the header and the runtime's values at hand (the lean routes)."""

    def __init__(self, *services: str) -> None:
        self.accepted = frozenset(services)
        if not self.accepted:
            raise ValueError("an internal route names at least one caller")
        self._listed = ", ".join(sorted(self.accepted))

    async def __call__(self, request: Request) -> Principal:
        return await self.admit_in(request.app.state.runtime, request.headers.get("authorization"))

    async def admit_in(self, runtime: Any, authorization: str | None) -> Principal:
        """``admit`` with the service's runtime's verifier, internal audience and origin."""
        return await self.admit(
            authorization,
            verifier=runtime.tokens,
            internal_audience=str(runtime.platform.internal_audience),
            origin=runtime.origin,
        )

    async def admit(
        self,
        authorization: str | None,
        *,
        verifier: JwksVerifier,
        internal_audience: str,
        origin: str | None,
    ) -> Principal:
        principal = await authenticate(authorization, verifier=verifier)
        if SERVICE_ROLE not in principal.roles or principal.audience != internal_audience:
            raise Problem(403, "This is an internal API: only services may call it.")
        if principal.service_name not in self.accepted:
            raise Problem(403, f"This internal API accepts calls from {self._listed} only.")
        if origin is None or principal.target != origin:
            raise Problem(403, "This service token was issued for another instance.")
        return principal


def internal_caller(*services: str) -> InternalCallers:
    """For ``/internal/*`` routes, as ``Annotated[Principal, Depends(internal_caller(...))]``:
    a service token (internal audience, role ``service``) of one of ``services`` only, issued
    for this very instance (its ``target`` is this instance's registered base URL); 401
    without a valid token, 403 for a user's token, another service's, or one issued for
    another instance (what a registered impostor received and tries to replay here)."""
    return InternalCallers(*services)


class ServiceTokenUnavailable(Exception):
    """No service token could be had (auth unreachable, or no secret or auth URL configured)."""


class ServiceTokens:
    """This service's own access tokens for internal calls, one per instance it calls, each
    kept until near expiry.

    Asked of the configured auth URL (``SHOP_AUTH_URL``) only: the secret goes nowhere else.
    Each token names its target instance, so the instance that receives it (even one that
    registered under a false name) cannot use it anywhere else.
    """

    def __init__(
        self,
        *,
        name: str,
        secret: SecretStr | None,
        auth_url: str | None,
        session: aiohttp.ClientSession,
        refresh_margin_s: float = 60.0,
        failure_pause_s: float = 2.0,
        max_targets: int = 256,
    ) -> None:
        self._name = name
        self._secret = secret
        self._auth_url = auth_url.rstrip("/") if auth_url else None
        self._session = session
        self._margin = refresh_margin_s
        # target -> (token, monotonic expiry); the oldest target goes first when full.
        self._tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._max_targets = max_targets
        self._failed_until = 0.0
        self._failure_pause_s = failure_pause_s
        self._lock = asyncio.Lock()

    def _held(self, target: str) -> str | None:
        held = self._tokens.get(target)
        if held is None or time.monotonic() > held[1] - self._margin:
            return None
        return held[0]

    async def bearer(self, target: str) -> str:
        """An ``Authorization`` header value carrying this service's identity, for calls to
        the instance at ``target`` (its base URL, ``Instance.base_url``) only."""
        token = self._held(target)
        if token is None:
            async with self._lock:
                token = self._held(target)
                if token is None:
                    # After a failed fetch, callers queued on the lock fail at once for a
                    # moment instead of each waiting out its own timeout in turn.
                    if time.monotonic() < self._failed_until:
                        raise ServiceTokenUnavailable("auth was unreachable a moment ago")
                    try:
                        token = await self._fetch(target)
                    except ServiceTokenUnavailable:
                        self._failed_until = time.monotonic() + self._failure_pause_s
                        raise
        return f"Bearer {token}"

    async def _fetch(self, target: str) -> str:
        if self._secret is None:
            raise ServiceTokenUnavailable("SHOP_SERVICE_SECRET is not set")
        if self._auth_url is None:
            raise ServiceTokenUnavailable("SHOP_AUTH_URL is not set")
        body = {"service": self._name, "secret": self._secret.get_secret_value(), "target": target}
        try:
            async with self._session.post(
                self._auth_url + SERVICE_TOKEN_PATH,
                json=body,
                headers=_PLAIN_JSON,
                timeout=aiohttp.ClientTimeout(total=3.0),
                # A redirect would carry the secret wherever it points.
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    raise ServiceTokenUnavailable(f"auth answered {resp.status}")
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ServiceTokenUnavailable(str(exc) or type(exc).__name__) from exc
        try:
            token, expires_in = str(answer["access_token"]), float(answer["expires_in"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceTokenUnavailable("auth answered without a usable token") from exc
        self._tokens[target] = (token, time.monotonic() + expires_in)
        self._tokens.move_to_end(target)
        while len(self._tokens) > self._max_targets:
            self._tokens.popitem(last=False)
        return token
