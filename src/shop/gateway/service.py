"""What the gateway does for a caller: admit them, find the service, forward, and describe
the whole public API."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp

from shop.gateway.domain import (
    ROUTED_SERVICES,
    Access,
    RouteTable,
    merge_openapi,
)
from shop.platform.discovery import Instance, RegistryClient, RegistryUnavailable
from shop.platform.problems import Problem
from shop.platform.security import authenticate, refuse_service_identity
from shop.platform.tokens import JwksVerifier, Principal
from shop.platform.upstream import Answer, ConnectFailed, UpstreamBroken, UpstreamPool

__all__ = [
    "ApiCatalogue",
    "Upstreams",
    "admit",
    "forward",
]

log = logging.getLogger("shop.gateway")

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

    An instance that refused a connection or timed out is passed over for a few seconds (its
    lease in the registry may outlive it by a minute and a half), so one dead instance does
    not fail every other request; it is taken back at once when the registry shows it
    registered again (a restarted process), see docs/registry.md "Discovery that heals".
    """

    def __init__(
        self,
        *,
        registry: RegistryClient,
        fixed: Mapping[str, str],
        pass_over_s: float = 5.0,
        cache_ttl_s: float = 0.0,
    ) -> None:
        self.registry = registry
        self._fixed = dict(fixed)
        self._pass_over_s = pass_over_s
        self._cache_ttl_s = cache_ttl_s
        self._failed_until: dict[str, float] = {}
        # Base URL passed over -> the registration time of its instance then (0: unknown).
        self._failed_registration: dict[str, int] = {}
        # Per service: the registry client's list, its base URLs, and until when that list is
        # certainly still the registry client's cached answer (see ready_candidates).
        self._urls: dict[str, tuple[list[Instance], list[str], float]] = {}
        self._cursors: dict[str, Iterator[int]] = {}
        self._ready_cursors: dict[str, Iterator[int]] = {}

    async def candidates(self, service: str) -> list[str]:
        """Base URLs to try in order: the round-robin choice, then one other as a fallback."""
        fixed = self._fixed.get(service)
        if fixed is not None:
            return [fixed]
        instances = await self.registry.instances(service)
        known = self._urls.get(service)
        if known is None or known[0] is not instances:
            # The registry client hands back the same list until it looks the service up again
            # (a new list: it has just done so, and keeps it for its cache TTL).
            fresh_until = time.monotonic() + self._cache_ttl_s
            known = self._urls[service] = (instances, [i.base_url for i in instances], fresh_until)
            if self._failed_until:
                self._take_back_registered(instances)
        return self._order(service, known[1], self._cursors)

    def _take_back_registered(self, instances: list[Instance]) -> None:
        """Stop passing over an instance the registry lists with a new registration."""
        for instance in instances:
            before = self._failed_registration.get(instance.base_url)
            if before is not None and before != instance.registered_at_ms:
                self._failed_until.pop(instance.base_url, None)
                del self._failed_registration[instance.base_url]

    def ready_candidates(self, service: str) -> list[str] | None:
        """``candidates`` without an await, for the gateway's fast lane: None when the
        registry client would have to be asked (nothing known, or its cache may be stale).
        Its round-robin turn is its own: requests it declines go on to ``candidates``, and a
        shared turn would send all of those to the same instance."""
        fixed = self._fixed.get(service)
        if fixed is not None:
            return [fixed]
        known = self._urls.get(service)
        if known is None or time.monotonic() >= known[2]:
            return None
        return self._order(service, known[1], self._ready_cursors)

    def _order(self, service: str, urls: list[str], cursors: dict[str, Iterator[int]]) -> list[str]:
        if not urls:
            return []
        if len(urls) > 1:
            turn = next(cursors.setdefault(service, itertools.count())) % len(urls)
            urls = urls[turn:] + urls[:turn]
        if self._failed_until:
            now = time.monotonic()
            healthy = [u for u in urls if self._failed_until.get(u, 0.0) <= now]
            urls = healthy or urls
        return urls[:2]

    def refused(self, base_url: str, service: str | None = None) -> None:
        """``base_url`` refused or timed out: pass it over, and (the first time) have
        ``service`` looked up afresh so a restart's new registration shows at once."""
        now = time.monotonic()
        first = self._failed_until.get(base_url, 0.0) <= now
        self._failed_until[base_url] = now + self._pass_over_s
        known = self._urls.get(service) if service is not None else None
        listed = [i for i in known[0] if i.base_url == base_url] if known else []
        self._failed_registration[base_url] = listed[0].registered_at_ms if listed else 0
        if first and service is not None and service not in self._fixed:
            self.registry.forget(service)


_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


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
    pool: UpstreamPool,
    head: bytes,
    body: bytes,
    method: str,
    timeout_s: float,
    retry_after_s: float,
    new_connection: bool = False,
) -> Answer:
    """Send the request to one instance of ``service``; its answer's status and headers.

    ``head`` is the request line and headers exactly as the caller's request is to reach the
    service (the target already canonical). Failing before the answer starts raises a
    Problem: 503 (no instance, refused), 504 (too slow), 502 (broke off).
    ``new_connection``: the request already broke on a kept-alive connection (the fast lane).
    """
    try:
        candidates = await upstreams.candidates(service)
    except RegistryUnavailable as exc:
        raise _unavailable(service, retry_after_s, "The service registry is unreachable.") from exc
    if not candidates:
        raise _unavailable(service, retry_after_s, f"No instance of {service} is up.")
    last = len(candidates) - 1
    for attempt, base_url in enumerate(candidates):
        try:
            return await pool.request(
                base_url,
                head,
                body,
                head_only=method == "HEAD",
                idempotent=method in _IDEMPOTENT,
                connect_timeout_s=min(2.0, timeout_s),
                timeout_s=timeout_s,
                new_connection=new_connection,
                # One span per request at the gateway: the proxy's (docs/telemetry.md).
                traced=False,
            )
        except ConnectFailed as exc:
            # Nothing reached the instance, so trying another one is safe for any method.
            upstreams.refused(base_url, service)
            log.warning("%s at %s unreachable (%s)", service, base_url, exc)
            if attempt == last:
                raise _unavailable(service, retry_after_s, f"{service} is unreachable.") from exc
        except TimeoutError as exc:
            # Not sent again (it may have been applied), but passed over by the next request.
            upstreams.refused(base_url, service)
            raise Problem(504, f"{service} did not answer within {timeout_s:g} s.") from exc
        except UpstreamBroken as exc:
            raise Problem(502, f"{service} broke off its answer.") from exc
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


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
