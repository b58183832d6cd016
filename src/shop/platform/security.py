"""Who is calling: bearer tokens checked against the auth service's JWKS.

The gateway is the first gate; every service checks the token again with these helpers
(``CurrentUser``, ``AdminUser``), so a request that bypassed the gateway gains nothing.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

import aiohttp
from fastapi import Depends, Request
from pydantic import SecretStr

from shop.platform.discovery import Instance, RegistryClient, RegistryUnavailable
from shop.platform.problems import Problem
from shop.platform.tokens import InvalidToken, JwksVerifier, KeysUnavailable, Principal

__all__ = [
    "AUTH_SERVICE",
    "JWKS_PATH",
    "SERVICE_ROLE",
    "SERVICE_TOKEN_PATH",
    "AdminUser",
    "CurrentUser",
    "ServiceCaller",
    "ServiceTokenUnavailable",
    "ServiceTokens",
    "authenticate",
    "bearer_token",
    "jwks_from_registry",
    "refuse_service_identity",
]

AUTH_SERVICE = "auth-service"
JWKS_PATH = "/auth/.well-known/jwks.json"
SERVICE_TOKEN_PATH = "/internal/service-token"  # noqa: S105 - a path, not a secret
SERVICE_ROLE = "service"
_BEARER = re.compile(r"^\s*bearer\s+([A-Za-z0-9._~+/=-]+)\s*$", re.IGNORECASE)
# The gateway's session does not decompress, so its own JSON reads ask for plain answers.
_PLAIN_JSON = {"Accept": "application/json", "Accept-Encoding": "identity"}


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    match = _BEARER.match(authorization)
    return match.group(1) if match else None


def jwks_from_registry(
    registry: RegistryClient, session: aiohttp.ClientSession
) -> Callable[[], Awaitable[Mapping[str, Any]]]:
    """A JWKS source: the auth service, found through the registry."""

    async def fetch() -> Mapping[str, Any]:
        instance = await registry.choose(AUTH_SERVICE)
        if instance is None:
            raise RegistryUnavailable("no auth-service instance is UP")
        async with session.get(
            instance.base_url + JWKS_PATH,
            headers=_PLAIN_JSON,
            timeout=aiohttp.ClientTimeout(total=3.0),
        ) as resp:
            if resp.status != 200:
                raise RegistryUnavailable(f"JWKS answered {resp.status}")
            body: Mapping[str, Any] = await resp.json(content_type=None)
            return body

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


def refuse_service_identity(principal: Principal) -> Principal:
    """A service token is nobody's login: it may call internal APIs, never act as a user."""
    if SERVICE_ROLE in principal.roles:
        raise Problem(403, "A service token cannot be used as a user's.")
    return principal


async def _caller(request: Request) -> Principal:
    verifier: JwksVerifier = request.app.state.runtime.tokens
    return await authenticate(request.headers.get("authorization"), verifier=verifier)


async def _current_user(request: Request) -> Principal:
    return refuse_service_identity(await _caller(request))


CurrentUser = Annotated[Principal, Depends(_current_user)]


async def _admin_user(principal: CurrentUser) -> Principal:
    if not principal.is_admin:
        raise Problem(403, "This needs the admin role.")
    return principal


AdminUser = Annotated[Principal, Depends(_admin_user)]


async def _service_caller(request: Request) -> Principal:
    principal = await _caller(request)
    if SERVICE_ROLE not in principal.roles:
        raise Problem(403, "This is an internal API: only services may call it.")
    return principal


ServiceCaller = Annotated[Principal, Depends(_service_caller)]
"""For ``/internal/*`` routes: a token auth issued to a service, never a user's."""


class ServiceTokenUnavailable(Exception):
    """No service token could be had (auth unreachable, or no shared secret configured)."""


class ServiceTokens:
    """This service's own access token for internal calls, from auth, kept until near expiry."""

    def __init__(
        self,
        *,
        name: str,
        secret: SecretStr | None,
        registry: RegistryClient,
        session: aiohttp.ClientSession,
        refresh_margin_s: float = 60.0,
        failure_pause_s: float = 2.0,
    ) -> None:
        self._name = name
        self._secret = secret
        self._registry = registry
        self._session = session
        self._margin = refresh_margin_s
        self._token: str | None = None
        self._expires_at = 0.0
        self._failed_until = 0.0
        self._failure_pause_s = failure_pause_s
        self._lock = asyncio.Lock()

    async def bearer(self) -> str:
        """An ``Authorization`` header value carrying this service's identity."""
        if self._token is None or time.monotonic() > self._expires_at - self._margin:
            async with self._lock:
                if self._token is None or time.monotonic() > self._expires_at - self._margin:
                    # After a failed fetch, callers queued on the lock fail at once for a
                    # moment instead of each waiting out its own timeout in turn.
                    if time.monotonic() < self._failed_until:
                        raise ServiceTokenUnavailable("auth was unreachable a moment ago")
                    try:
                        await self._fetch()
                    except ServiceTokenUnavailable:
                        self._failed_until = time.monotonic() + self._failure_pause_s
                        raise
        return f"Bearer {self._token}"

    async def _fetch(self) -> None:
        if self._secret is None:
            raise ServiceTokenUnavailable("SHOP_SERVICE_SECRET is not set")
        instance = await self._lookup()
        body = {"service": self._name, "secret": self._secret.get_secret_value()}
        try:
            async with self._session.post(
                instance.base_url + SERVICE_TOKEN_PATH,
                json=body,
                headers=_PLAIN_JSON,
                timeout=aiohttp.ClientTimeout(total=3.0),
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
        self._token = token
        self._expires_at = time.monotonic() + expires_in

    async def _lookup(self) -> Instance:
        try:
            instance = await self._registry.choose(AUTH_SERVICE)
        except RegistryUnavailable as exc:
            raise ServiceTokenUnavailable(str(exc)) from exc
        if instance is None:
            raise ServiceTokenUnavailable("no auth-service instance is UP")
        return instance
