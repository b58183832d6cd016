"""What the gateway does for a caller: admit them, find the service, forward, and describe
the whole public API."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from multidict import CIMultiDict
from starlette.types import Send
from yarl import URL

from shop.gateway.domain import (
    ROUTED_SERVICES,
    Access,
    RouteTable,
    merge_openapi,
    response_headers,
)
from shop.platform.discovery import RegistryClient, RegistryUnavailable
from shop.platform.problems import Problem
from shop.platform.security import authenticate, refuse_service_identity
from shop.platform.tokens import JwksVerifier, Principal

__all__ = [
    "ApiCatalogue",
    "Upstreams",
    "admit",
    "forward",
]

log = logging.getLogger("shop.gateway")

# Let aiohttp add nothing the caller did not send: the service must see the caller's request.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# The shared session does not decompress (proxied bodies pass through as they are), so the
# gateway's own JSON reads ask for an uncompressed answer.
_PLAIN_JSON = {"Accept": "application/json", "Accept-Encoding": "identity"}


async def admit(
    access: Access, *, authorization: str | None, verifier: JwksVerifier
) -> Principal | None:
    """Apply a route's rule. The services verify the token again; this is the first gate."""
    if access is Access.PUBLIC:
        return None
    principal = refuse_service_identity(await authenticate(authorization, verifier=verifier))
    if access is Access.ADMIN and not principal.is_admin:
        raise Problem(403, "This needs the admin role.")
    return principal


class Upstreams:
    """Where a service is reached: a fixed URL, or its UP instances from the registry.

    An instance that refused a connection is passed over for a few seconds (its lease in the
    registry may outlive it by a minute and a half), so one dead instance does not fail
    every other request.
    """

    def __init__(
        self,
        *,
        registry: RegistryClient,
        fixed: Mapping[str, str],
        pass_over_s: float = 5.0,
    ) -> None:
        self.registry = registry
        self._fixed = dict(fixed)
        self._pass_over_s = pass_over_s
        self._failed_until: dict[str, float] = {}

    async def candidates(self, service: str) -> list[str]:
        """Base URLs to try in order: the round-robin choice, then one other as a fallback."""
        fixed = self._fixed.get(service)
        if fixed is not None:
            return [fixed]
        chosen = await self.registry.choose(service)
        if chosen is None:
            return []
        instances = await self.registry.instances(service)
        urls = [chosen.base_url] + [i.base_url for i in instances if i != chosen]
        if self._failed_until:
            now = time.monotonic()
            healthy = [u for u in urls if self._failed_until.get(u, 0.0) <= now]
            urls = healthy or urls
        return urls[:2]

    def refused(self, base_url: str) -> None:
        self._failed_until[base_url] = time.monotonic() + self._pass_over_s


def _unavailable(service: str, retry_after_s: float, detail: str) -> Problem:
    return Problem(
        503,
        detail or f"{service} is unavailable.",
        headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))},
    )


async def forward(
    *,
    upstreams: Upstreams,
    service: str,
    session: aiohttp.ClientSession,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    timeout_s: float,
    retry_after_s: float,
    send: Send,
) -> None:
    """Send the request to one instance of ``service`` and stream its answer back.

    ``target`` is the path and query exactly as the caller sent them (already canonical).
    Failing before the answer starts raises a Problem: 503 (no instance, refused), 504 (too
    slow), 502 (broke off); once the answer has started, the connection is cut.
    """
    try:
        candidates = await upstreams.candidates(service)
    except RegistryUnavailable as exc:
        raise _unavailable(service, retry_after_s, "The service registry is unreachable.") from exc
    if not candidates:
        raise _unavailable(service, retry_after_s, f"No instance of {service} is up.")
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=min(2.0, timeout_s), sock_read=timeout_s
    )
    outgoing = CIMultiDict(headers)
    for attempt, base_url in enumerate(candidates):
        try:
            async with session.request(
                method,
                URL(base_url + target, encoded=True),
                headers=outgoing,
                data=body or None,
                timeout=timeout,
                allow_redirects=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
            ) as resp:
                await _relay(resp, send)
                return
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Nothing reached the instance, so trying another one is safe for any method.
            upstreams.refused(base_url)
            log.warning("%s at %s unreachable (%s)", service, base_url, exc)
            if attempt == len(candidates) - 1:
                raise _unavailable(service, retry_after_s, f"{service} is unreachable.") from exc
        except TimeoutError as exc:
            raise Problem(504, f"{service} did not answer within {timeout_s:g} s.") from exc
        except aiohttp.ClientError as exc:
            raise Problem(502, f"{service} broke off its answer.") from exc


class _AnswerStarted(Exception):
    """The service failed mid-answer: the caller's connection must be cut, not answered."""


async def _relay(resp: aiohttp.ClientResponse, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": resp.status,
            "headers": response_headers(resp.raw_headers),
        }
    )
    try:
        async for chunk in resp.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _AnswerStarted(str(exc)) from exc
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class ApiCatalogue:
    """The merged OpenAPI document of every routed service, rebuilt at most every ``ttl_s``."""

    def __init__(
        self,
        *,
        upstreams: Upstreams,
        session: aiohttp.ClientSession,
        routes: RouteTable,
        ttl_s: float = 30.0,
    ) -> None:
        self._upstreams = upstreams
        self._session = session
        self._routes = routes
        self._ttl_s = ttl_s
        self._document: dict[str, Any] | None = None
        self._built_at = float("-inf")
        self._lock = asyncio.Lock()

    async def document(self) -> dict[str, Any]:
        async with self._lock:
            if self._document is None or time.monotonic() - self._built_at >= self._ttl_s:
                results = await asyncio.gather(*(self._fetch(s) for s in ROUTED_SERVICES))
                found = {s: doc for s, doc in zip(ROUTED_SERVICES, results, strict=True) if doc}
                self._document = merge_openapi(found, routes=self._routes)
                self._built_at = time.monotonic()
            return self._document

    async def _fetch(self, service: str) -> Mapping[str, Any] | None:
        """A service that is down is simply absent from the document."""
        try:
            candidates = await self._upstreams.candidates(service)
            if not candidates:
                return None
            async with self._session.get(
                candidates[0] + "/openapi.json",
                headers=_PLAIN_JSON,
                timeout=aiohttp.ClientTimeout(total=2.0),
            ) as resp:
                if resp.status != 200:
                    return None
                document = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, RegistryUnavailable, ValueError) as exc:
            log.info("no API description from %s (%s)", service, exc)
            return None
        return document if isinstance(document, dict) else None
