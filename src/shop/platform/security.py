"""Who is calling: bearer tokens checked against the auth service's JWKS.

The gateway is the first gate; every service checks the token again with these helpers
(``CurrentUser``, ``AdminUser``), so a request that bypassed the gateway gains nothing.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

import aiohttp
from fastapi import Depends, Request

from shop.platform.discovery import RegistryClient, RegistryUnavailable
from shop.platform.problems import Problem
from shop.platform.tokens import InvalidToken, JwksVerifier, KeysUnavailable, Principal

__all__ = [
    "AUTH_SERVICE",
    "JWKS_PATH",
    "AdminUser",
    "CurrentUser",
    "authenticate",
    "bearer_token",
    "jwks_from_registry",
]

AUTH_SERVICE = "auth-service"
JWKS_PATH = "/auth/.well-known/jwks.json"
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


async def _current_user(request: Request) -> Principal:
    verifier: JwksVerifier = request.app.state.runtime.tokens
    return await authenticate(request.headers.get("authorization"), verifier=verifier)


CurrentUser = Annotated[Principal, Depends(_current_user)]


async def _admin_user(principal: CurrentUser) -> Principal:
    if not principal.is_admin:
        raise Problem(403, "This needs the admin role.")
    return principal


AdminUser = Annotated[Principal, Depends(_admin_user)]
