"""Client of the discovery server (the Eureka REST protocol): register, heartbeat, look up.

Lookups are cached per application for a few seconds and served stale if the registry
is briefly unreachable, so no request pays a registry round trip. Given several registries,
the client uses whichever answers. An instance a caller reports as refusing (or timing out)
is passed over until it proves alive: its quarantine ends, the registry shows a new
registration of it (a restarted process registers again at once), or, after it was seen not
answering, it answers its health check again (a frozen process thawed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from yarl import URL

from shop.platform.worker import Loop

__all__ = ["Heartbeat", "Instance", "Registration", "RegistryClient", "RegistryUnavailable"]

log = logging.getLogger("shop.discovery")

# The gateway shares this session with auto-decompression off, so ask for plain JSON.
_JSON = {
    "Accept": "application/json",
    "Accept-Encoding": "identity",
    "Content-Type": "application/json",
}


# While a caller asks ``proved_alive``, how often the application is looked up again and
# its passed-over instances' health checked.
_RECHECK_S = 1.0
_HEALTH_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}


class RegistryUnavailable(Exception):
    """The registry could not be reached and nothing is cached for the application."""


def _host_in_url(host: str) -> str:
    """An IPv6 address is bracketed in a URL (``http://[::1]:8080``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _endpoint(url: str) -> tuple[str, str | None]:
    """A registry URL without its userinfo, and the Basic credentials that userinfo held
    (``http://order-service:<secret>@registry:8761/eureka``, as Eureka deployments write it)."""
    try:
        parsed = URL(url.strip())
    except ValueError:
        raise ValueError("a registry URL is not a URL") from None
    authorization = None
    if parsed.user is not None:
        pair = f"{parsed.user}:{parsed.password or ''}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return str(parsed.with_user(None)).rstrip("/"), authorization


@dataclass(frozen=True, slots=True)
class Instance:
    app: str
    instance_id: str
    host: str
    port: int
    status: str = "UP"
    secure: bool = False
    # When the registry took this registration (leaseInfo.registrationTimestamp, ms; 0 when
    # unknown): a restarted process registers again, so a new value proves it is back.
    registered_at_ms: int = field(default=0, compare=False)

    @property
    def base_url(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{_host_in_url(self.host)}:{self.port}"

    @classmethod
    def from_eureka(cls, raw: dict[str, Any]) -> Instance:
        # An instance that enables its secure port is called there, over https (Eureka's way).
        secure_port = raw.get("securePort")
        secure = isinstance(secure_port, dict) and str(secure_port.get("@enabled")) == "true"
        port: Any = secure_port if secure else raw.get("port", 0)
        if isinstance(port, dict):
            port = port.get("$", 0)
        lease = raw.get("leaseInfo")
        registered: Any = lease.get("registrationTimestamp", 0) if isinstance(lease, dict) else 0
        return cls(
            app=str(raw.get("app", "")).lower(),
            instance_id=str(raw.get("instanceId") or raw.get("hostName")),
            host=str(raw.get("ipAddr") or raw.get("hostName")),
            port=int(port),
            status=str(raw.get("status", "UNKNOWN")),
            secure=secure,
            registered_at_ms=int(registered) if str(registered).isdigit() else 0,
        )


@dataclass(frozen=True, slots=True)
class Registration:
    app: str
    host: str
    port: int
    lease_duration_s: int = 90
    renewal_interval_s: float = 30.0
    metadata: dict[str, str] = field(default_factory=dict)
    # Served over TLS: registered as the secure port, its URLs https.
    secure: bool = False

    @property
    def instance_id(self) -> str:
        return f"{self.host}:{self.app}:{self.port}"

    @property
    def base_url(self) -> str:
        """Where callers reach this instance: what they find in the registry."""
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{_host_in_url(self.host)}:{self.port}"

    def to_eureka(self) -> dict[str, Any]:
        base = self.base_url
        plain, secure = ("false", "true") if self.secure else ("true", "false")
        return {
            "instance": {
                "instanceId": self.instance_id,
                "hostName": self.host,
                "app": self.app.upper(),
                "ipAddr": self.host,
                "vipAddress": self.app,
                "secureVipAddress": self.app,
                "status": "UP",
                "port": {"$": self.port, "@enabled": plain},
                "securePort": {"$": self.port if self.secure else 443, "@enabled": secure},
                "homePageUrl": f"{base}/",
                "statusPageUrl": f"{base}/health/live",
                "healthCheckUrl": f"{base}/health/ready",
                "dataCenterInfo": {
                    "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                    "name": "MyOwn",
                },
                "leaseInfo": {
                    "renewalIntervalInSecs": max(1, round(self.renewal_interval_s)),
                    "durationInSecs": self.lease_duration_s,
                },
                "metadata": dict(self.metadata),
            }
        }


@dataclass(slots=True)
class _Cached:
    instances: list[Instance]
    fetched_at: float


@dataclass(frozen=True, slots=True)
class _PassedOver:
    """An instance that refused or timed out: skipped until ``until`` or a new registration,
    or until it answers its health check after one went unanswered (``unresponsive``)."""

    app: str
    until: float
    registered_at_ms: int
    instance: Instance
    unresponsive: bool = False


class RegistryClient:
    """Talks to one registry out of several (``base_url``: a list, or URLs separated by
    commas): it keeps to the one that answered last and moves on to the next, in the given
    order, when one refuses, times out or answers 5xx. Registries sharing one store (etcd)
    serve the same view, so any of them will do.

    A URL's userinfo is this service's registry credential: it is sent as HTTP Basic with
    register, renew and cancel, and kept out of ``base_urls`` and every message.

    ``choose`` round-robins over the UP instances and skips one reported by ``refused``
    for ``pass_over_s`` (see docs/registry.md, "Discovery that heals")."""

    def __init__(
        self,
        *,
        base_url: str | Sequence[str],
        session: aiohttp.ClientSession,
        cache_ttl_s: float = 5.0,
        timeout_s: float = 2.0,
        pass_over_s: float = 5.0,
        health_timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        urls = base_url.split(",") if isinstance(base_url, str) else base_url
        endpoints = [_endpoint(url) for url in urls if url.strip()]
        if not endpoints:
            raise ValueError("the registry client needs at least one registry URL")
        self.base_urls = [url for url, _ in endpoints]
        # The Authorization header of each registry's writes (None: its URL has no credential).
        self._authorizations = [authorization for _, authorization in endpoints]
        self._current = 0
        self._session = session
        self._ttl = cache_ttl_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._cache: dict[str, _Cached] = {}
        # Outlives each refresh of the cache: a fresh cursor would pick the first one again.
        self._cursors: dict[str, itertools.count[int]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pass_over_s = pass_over_s
        self._health_timeout = aiohttp.ClientTimeout(total=health_timeout_s)
        self._clock = clock
        # Instance id -> its quarantine; empty (the usual case) costs choose() one test.
        self._passed_over: dict[str, _PassedOver] = {}
        # Background rechecks started by proved_alive, one at a time per application.
        self._rechecks: dict[str, asyncio.Task[None]] = {}
        self._rechecked_at: dict[str, float] = {}
        # What proved_alive has accounted for, per application: instance id -> registration
        # (ms); the cached lookup it last compared; applications with a thawed instance.
        self._known: dict[str, dict[str, int]] = {}
        self._compared: dict[str, _Cached] = {}
        self._thawed: set[str] = set()
        self._closed = False

    @property
    def base_url(self) -> str:
        """The registry that answered last (the first one until then)."""
        return self.base_urls[self._current]

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        authenticated: bool = False,
    ) -> tuple[int, Any]:
        """The status of the first registry to answer below 500 and, on a 200, its JSON.
        ``authenticated``: a write, sent with this service's credential for that registry."""
        failures: list[str] = []
        for step in range(len(self.base_urls)):
            index = (self._current + step) % len(self.base_urls)
            url = self.base_urls[index] + path
            headers = _JSON
            authorization = self._authorizations[index]
            if authenticated and authorization:
                headers = {**_JSON, "Authorization": authorization}
            try:
                async with self._session.request(
                    method,
                    url,
                    params=params,
                    json=body,
                    headers=headers,
                    timeout=self._timeout,
                ) as resp:
                    if resp.status >= 500:
                        failures.append(f"{url} answered {resp.status}")
                        continue
                    answer = await resp.json() if resp.status == 200 and method == "GET" else None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                # ValueError: a 200 whose body is not JSON; that registry is not well either.
                failures.append(f"{url}: {str(exc) or type(exc).__name__}")
                continue
            if index != self._current:
                log.warning("registry %s answers; moving to it (%s)", url, "; ".join(failures))
                self._current = index
            return resp.status, answer
        raise RegistryUnavailable("; ".join(failures))

    async def register(self, registration: Registration) -> None:
        path = f"/apps/{registration.app.upper()}"
        status, _ = await self._call(
            "POST", path, body=registration.to_eureka(), authenticated=True
        )
        if status in (401, 403):
            raise RegistryUnavailable(
                f"register answered {status}: SHOP_REGISTRY_URL must carry this service's"
                f" credentials (http://{registration.app}:<secret>@registry:8761/eureka)"
            )
        if status not in (200, 204):
            raise RegistryUnavailable(f"register answered {status}")

    async def renew(self, registration: Registration) -> bool:
        """False when the registry no longer knows the instance (it must register again)."""
        path = f"/apps/{registration.app.upper()}/{registration.instance_id}"
        status, _ = await self._call("PUT", path, params={"status": "UP"}, authenticated=True)
        if status == 404:
            return False
        if status != 200:
            raise RegistryUnavailable(f"renew answered {status}")
        return True

    async def cancel(self, registration: Registration) -> None:
        await self._call(
            "DELETE",
            f"/apps/{registration.app.upper()}/{registration.instance_id}",
            authenticated=True,
        )

    async def fetch(self, app: str) -> list[Instance]:
        """Ask the registry now: every instance of ``app`` whatever its status."""
        status, body = await self._call("GET", f"/apps/{app.upper()}")
        if status == 404:
            return []
        if status != 200 or not isinstance(body, dict):
            raise RegistryUnavailable(f"registry answered {status}")
        raw = body.get("application", {}).get("instance", [])
        if isinstance(raw, dict):
            raw = [raw]
        return [Instance.from_eureka(item) for item in raw]

    async def instances(self, app: str) -> list[Instance]:
        """UP instances of ``app``, from the cache when it is fresh."""
        app = app.lower()
        cached = self._cache.get(app)
        if cached and self._clock() - cached.fetched_at < self._ttl:
            return cached.instances
        lock = self._locks.setdefault(app, asyncio.Lock())
        async with lock:
            cached = self._cache.get(app)
            if cached and self._clock() - cached.fetched_at < self._ttl:
                return cached.instances
            try:
                found = [i for i in await self.fetch(app) if i.status == "UP"]
            except RegistryUnavailable:
                if cached:
                    log.warning("registry unreachable; serving cached instances of %s", app)
                    cached.fetched_at = self._clock()
                    return cached.instances
                raise
            self._remember(app, found)
            return found

    def _remember(self, app: str, found: list[Instance]) -> None:
        self._cache[app] = _Cached(instances=found, fetched_at=self._clock())
        if self._passed_over:
            # The quarantine of an instance no longer listed would never be looked at again.
            listed = {i.instance_id for i in found}
            for gone in [
                key
                for key, held in self._passed_over.items()
                if held.app == app and key not in listed
            ]:
                del self._passed_over[gone]

    async def choose(self, app: str) -> Instance | None:
        """Round-robin over the UP instances of ``app``, passing over those that refused."""
        instances = await self.instances(app)
        if not instances:
            return None
        cursor = self._cursors.setdefault(app.lower(), itertools.count())
        turn = next(cursor)
        if not self._passed_over:
            return instances[turn % len(instances)]
        return self._healthy(instances, turn)

    def _healthy(self, instances: list[Instance], turn: int) -> Instance:
        """The first instance from ``turn`` on that is not passed over. One whose quarantine
        ended, or that registered again since it refused, is taken back. When every one is
        passed over, the one whose quarantine ends first: a caller still gets an answer (a
        refused connection costs microseconds), and its breaker bounds how often it asks."""
        now = self._clock()
        count = len(instances)
        for step in range(count):
            instance = instances[(turn + step) % count]
            held = self._passed_over.get(instance.instance_id)
            if held is None:
                return instance
            if now >= held.until or instance.registered_at_ms != held.registered_at_ms:
                del self._passed_over[instance.instance_id]
                return instance
        return min(instances, key=lambda i: self._passed_over[i.instance_id].until)

    def refused(self, instance: Instance) -> None:
        """``instance`` refused a connection or timed out: pass it over for ``pass_over_s``
        (or until it proves alive), and look ``app`` up afresh on the next choice, so a
        removed or re-registered instance shows at once."""
        app = instance.app.lower()
        known = self._known.get(app)
        if known is None:
            # What existed when things went wrong is not news to proved_alive later.
            cached = self._cache.get(app)
            listed = cached.instances if cached else []
            known = self._known[app] = {i.instance_id: i.registered_at_ms for i in listed}
        known[instance.instance_id] = instance.registered_at_ms
        previous = self._passed_over.get(instance.instance_id)
        self._passed_over[instance.instance_id] = _PassedOver(
            app=app,
            until=self._clock() + self._pass_over_s,
            registered_at_ms=instance.registered_at_ms,
            instance=instance,
            # Failing again while frozen: still known not to answer its health check.
            unresponsive=previous is not None
            and previous.unresponsive
            and previous.registered_at_ms == instance.registered_at_ms,
        )
        self.forget(app)

    def proved_alive(self, app: str) -> bool:
        """Without waiting: whether an instance of ``app`` has proved alive since this was last
        answered (or since an instance of ``app`` refused): the latest lookup lists a
        registration not seen before (a restarted process registers anew, under its old
        instance id or a new one; an instance was added), or a passed-over instance that did
        not answer its health check answers it now (a frozen process thawed). Each proof is
        answered True once. Meant for a caller that holds the peer to be down (a breaker
        that is open): while it asks, ``app`` is looked up again and its passed-over
        instances' ``/health/ready`` asked in the background, at most every ``_RECHECK_S``."""
        app = app.lower()
        self._recheck_soon(app)
        if app in self._thawed:
            self._thawed.discard(app)
            return True
        cached = self._cache.get(app)
        if cached is None or self._compared.get(app) is cached:
            return False
        self._compared[app] = cached
        listed = {i.instance_id: i.registered_at_ms for i in cached.instances}
        known = self._known.get(app)
        self._known[app] = listed
        if known is None:
            return False  # the first look: what is listed now is the baseline
        return any(known.get(key) != registered for key, registered in listed.items())

    async def close(self) -> None:
        """Stop the background rechecks (one may be waiting on a health check) and start no
        more: called before the HTTP session they use is closed, so that none of them ends
        in a "session closed" error at shutdown."""
        self._closed = True
        running = [task for task in self._rechecks.values() if not task.done()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _recheck_soon(self, app: str) -> None:
        if self._closed:
            return
        running = self._rechecks.get(app)
        if running is not None and not running.done():
            return
        now = self._clock()
        last = self._rechecked_at.get(app)
        if last is not None and now - last < _RECHECK_S:
            return
        self._rechecked_at[app] = now
        # A context of its own: the lookup belongs to no one request (nor to its trace).
        self._rechecks[app] = asyncio.create_task(
            self._recheck(app), name=f"registry-recheck-{app}", context=contextvars.Context()
        )

    async def _recheck(self, app: str) -> None:
        """Look ``app`` up now and ask each of its passed-over instances whether it answers."""
        suspects = [held for held in self._passed_over.values() if held.app == app]
        _, *answers = await asyncio.gather(
            self._look_up_now(app), *(self._answers(held.instance) for held in suspects)
        )
        for held, answered in zip(suspects, answers, strict=True):
            key = held.instance.instance_id
            current = self._passed_over.get(key)
            if current is None:
                continue  # taken back meanwhile
            if not answered:
                if not current.unresponsive:
                    self._passed_over[key] = replace(current, unresponsive=True)
                    log.info("%s does not answer its health check", key)
            elif current.unresponsive:
                # Seen not answering, now answering: back (a slow instance that always
                # answers its health check proves nothing and waits out its quarantine).
                del self._passed_over[key]
                self._thawed.add(app)
                log.info("%s answers its health check again; taken back", key)

    async def _answers(self, instance: Instance) -> bool:
        """Whether ``instance`` answers ``GET /health/ready`` with 200 in ``health_timeout_s``."""
        try:
            async with self._session.get(
                instance.base_url + "/health/ready",
                headers=_HEALTH_HEADERS,
                timeout=self._health_timeout,
                allow_redirects=False,
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _look_up_now(self, app: str) -> None:
        """Look ``app`` up now, whatever the cache's age; an unreachable registry leaves the
        cached answer as it is (the next recheck tries again)."""
        async with self._locks.setdefault(app, asyncio.Lock()):
            try:
                found = [i for i in await self.fetch(app) if i.status == "UP"]
            except RegistryUnavailable as exc:
                log.debug("recheck of %s: registry unreachable (%s)", app, exc)
                return
            self._remember(app, found)

    def forget(self, app: str) -> None:
        """Drop the cached lookup of ``app``: the next choice asks the registry."""
        self._cache.pop(app.lower(), None)


# Eureka metadata keys saying what the instance's own GET /health says (UP or DEGRADED) and
# why: its status stays UP (a degraded instance still serves), the dashboard shows them.
HEALTH_KEY = "health"
HEALTH_REASON_KEY = "healthReason"


class Heartbeat:
    """Keeps one registration alive: registers, renews, registers again after eviction.

    A job on the common loop (``shop.platform.worker``): a registry that cannot be reached
    is tried again after a back-off from 0.2 s doubling to 5 s, and any other failure of a
    beat is logged, counted and tried again the same way: the heartbeat never ends while
    the process serves."""

    def __init__(self, client: RegistryClient, registration: Registration) -> None:
        self.client = client
        self.registration = registration
        self.registered = False
        # Set when the registration changed (report_health) and must be sent at once.
        self._changed = False
        self._loop = Loop(
            self._beat,
            name=f"heartbeat-{registration.app}",
            interval_s=registration.renewal_interval_s,
            backoff_s=0.2,
            backoff_max_s=5.0,
            expected=(aiohttp.ClientError, TimeoutError, RegistryUnavailable),
            # Each registry call is bounded (2 s per node): wait out the one in hand.
            grace_s=5.0,
        )

    @property
    def failures(self) -> int:
        """Beats that failed since the heartbeat was made."""
        return self._loop.failures

    def report_health(self, status: str, reason: str | None = None) -> None:
        """Tell the registry the instance's health (``DEGRADED`` and why) in its metadata, at
        once if it changed; ``UP`` removes it. Eureka's statuses have no "degraded", and DOWN
        or OUT_OF_SERVICE would take an instance that still serves out of callers' lists."""
        metadata = {
            k: v
            for k, v in self.registration.metadata.items()
            if k not in (HEALTH_KEY, HEALTH_REASON_KEY)
        }
        if status != "UP":
            metadata[HEALTH_KEY] = status
            if reason:
                metadata[HEALTH_REASON_KEY] = reason[:500]
        if metadata == self.registration.metadata:
            return
        self.registration = replace(self.registration, metadata=metadata)
        self._changed = True
        self._loop.wake()

    def start(self) -> None:
        self._loop.start()

    async def check_registered(self) -> None:
        """Readiness: raise unless the registry currently holds this registration."""
        if not self.registered:
            raise RuntimeError("not registered with the discovery server")

    async def _beat(self) -> bool:
        """Register (first, after an eviction or a failure, or when the registration
        changed) or renew; True to go again at once."""
        try:
            if not self.registered or self._changed:
                self._changed = False
                again = self.registered
                await self.client.register(self.registration)
                self.registered = True
                log.info(
                    "%s %s as %s%s",
                    "updated" if again else "registered",
                    self.registration.app,
                    self.registration.instance_id,
                    f" ({self.registration.metadata.get(HEALTH_KEY, 'UP')})" if again else "",
                )
                return False
            if not await self.client.renew(self.registration):
                log.warning("registry forgot %s; registering again", self.registration.app)
                self.registered = False
                return True
            return False
        except Exception:
            # Whatever went wrong, registering again (which sends the latest) is safe.
            self.registered = False
            self._changed = False
            raise

    async def stop(self) -> None:
        """Let a beat in hand finish, then take the registration out of the registry."""
        await self._loop.stop()
        if self.registered:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, RegistryUnavailable):
                await self.client.cancel(self.registration)
            self.registered = False
