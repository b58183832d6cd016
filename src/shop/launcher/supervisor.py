"""Start the Shop's processes, learn their ports, wait until each is ready, restart one that
crashes later, stop them all.

Each child runs in its own session (so a terminal's Ctrl-C reaches only the launcher,
which then stops the children in order) and, on Linux, is told to die with the
launcher (``PR_SET_PDEATHSIG``), so even a ``kill -9`` of the launcher leaves no orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TextIO
from urllib.parse import urlsplit

from shop.launcher.console import LAUNCHER, Console
from shop.launcher.services import SERVICES, ServiceSpec, check_table, with_ports
from shop.launcher.settings import (
    REGISTRY_CLIENTS,
    REGISTRY_CLIENTS_FILE,
    SERVICE_CLIENTS,
    SERVICE_SECRET,
    child_environment,
    registry_clients,
    service_clients,
    with_credentials,
)
from shop.launcher.zygote import Zygote, die_with_launcher, fork_server_wanted

__all__ = [
    "EXIT_REFUSED",
    "RestartBudget",
    "RestartPolicy",
    "ServiceFailed",
    "Supervisor",
    "describe_exit",
    "parse_listening",
    "shop_system",
]

_LISTENING = re.compile(
    r'listening on http://(?P<host>\[[^\]]*\]|[^\s/]+?):(?P<port>\d{1,5})(?=[\s/"]|$)'
)
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "[::1]"}  # noqa: S104 - mapped away
_KEPT_LINES = 40
_SHOWN_LINES = 15
_LINE_LIMIT = 1 << 20
_READ_SIZE = 1 << 16
# /health/ready is asked again on each line the service prints (it logs what makes it ready:
# migrated, started, registered) and at the latest after these pauses, doubling.
_FIRST_POLL_S = 0.05
_LAST_POLL_S = 0.1
JWKS_PATH = "/auth/.well-known/jwks.json"
_PROBE_TIMEOUT_S = 2.0
# What a service exits with when it refuses its settings (shop.platform.serve.EXIT_REFUSED,
# which the launcher does not import): a configuration error, which no restart mends.
EXIT_REFUSED = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class RestartPolicy:
    """When a service that crashed after start-up is started again.

    The n-th crash within ``window_s`` waits ``first_delay_s * 2**(n-1)`` (at most
    ``max_delay_s``) before the restart; one more than ``limit`` within the window stops the
    whole Shop. ``limit=0`` is fail-fast: the first crash stops everything."""

    limit: int = 5
    window_s: float = 60.0
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.limit < 0 or self.window_s <= 0 or not 0 <= self.first_delay_s <= self.max_delay_s:
            raise ValueError(f"not a restart policy: {self}")


class RestartBudget:
    """One service's crashes within the policy's window: how long to wait before restarting it,
    or None once it has crashed more often than the limit allows."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._crashes: deque[float] = deque()

    @property
    def crashes(self) -> int:
        """Crashes within the window, as of the last ``crashed()``."""
        return len(self._crashes)

    def crashed(self) -> float | None:
        now = self.policy.clock()
        self._crashes.append(now)
        while now - self._crashes[0] > self.policy.window_s:
            self._crashes.popleft()
        if len(self._crashes) > self.policy.limit:
            return None
        delay = self.policy.first_delay_s * 2 ** (len(self._crashes) - 1)
        return float(min(delay, self.policy.max_delay_s))


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _port_of(url: str) -> int:
    return urlsplit(url).port or 0


def parse_listening(line: str) -> str | None:
    """The base URL a ``<name> listening on http://HOST:PORT`` line announces, as seen from here."""
    match = _LISTENING.search(line)
    if match is None:
        return None
    host = _WILDCARDS.get(match["host"], match["host"])
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{int(match['port'])}"


def _probe(url: str) -> str:
    """``GET url``: the status, or the error's name. The standard library's client, in a worker
    thread: importing aiohttp for this cost the launcher 0.34 s of CPU at every start."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port, timeout=_PROBE_TIMEOUT_S
    )
    try:
        connection.request("GET", parts.path)
        with connection.getresponse() as response:
            response.read()
            return str(response.status)
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        connection.close()


class LineSplitter:
    """Bytes as they come from a pipe, cut into whole lines (decoded, line ends dropped); a
    line over ``limit`` bytes is replaced by a note saying it was cut."""

    def __init__(self, limit: int = _LINE_LIMIT) -> None:
        self._limit = limit
        self._pending = b""
        self._cutting = False  # dropping the rest of an over-long line

    def feed(self, chunk: bytes) -> list[str]:
        *whole, self._pending = (self._pending + chunk).split(b"\n")
        lines = []
        for raw in whole:
            if self._cutting:
                self._cutting = False  # the end of the over-long line
                continue
            lines.append(raw.decode(errors="replace").rstrip("\r"))
        if len(self._pending) > self._limit:
            lines.append(f"[a line longer than {self._limit} bytes was cut]")
            self._pending, self._cutting = b"", True
        return lines

    def end(self) -> list[str]:
        """The last line, if the stream ended without a line end."""
        rest, self._pending = self._pending, b""
        if not rest or self._cutting:
            return []
        return [rest.decode(errors="replace").rstrip("\r")]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ServiceFailed(Exception):
    """A service crashed, or did not become ready in time. Everything was stopped."""

    def __init__(
        self, name: str, *, reason: str, exit_code: int | None, last_lines: Sequence[str]
    ) -> None:
        self.name = name
        self.reason = reason
        self.exit_code = exit_code
        self.last_lines = list(last_lines)
        tail = "".join(f"\n    {line}" for line in self.last_lines)
        super().__init__(f"{name} {reason}{tail}")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class _ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells the moment the process exits.

    ``Process.wait()`` also waits for its pipes to close, which never happens while
    something the service started still holds its output open.
    """

    def __init__(self, *, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


async def _spawn_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    preexec_fn: Callable[[], None] | None,
) -> tuple[asyncio.subprocess.Process, _ExitAwareProtocol]:
    """``asyncio.create_subprocess_exec``, keeping hold of the protocol to learn of the exit."""
    loop = asyncio.get_running_loop()
    protocol = _ExitAwareProtocol(limit=_LINE_LIMIT, loop=loop)
    transport, _ = await loop.subprocess_exec(
        lambda: protocol,
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        # One stream keeps a traceback's lines in order with the log lines before it.
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env),
        # Its own session: a terminal's Ctrl-C reaches only the launcher, which stops
        # the children in order; and the whole group can be signalled at once.
        start_new_session=True,
        preexec_fn=preexec_fn,
    )
    return asyncio.subprocess.Process(transport, protocol, loop), protocol


class _Process(Protocol):
    """What the supervisor needs of a service's process: exec'd, or forked by the zygote."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    @property
    def stdout(self) -> asyncio.StreamReader | None: ...


async def _exit_code_of(process: asyncio.subprocess.Process, protocol: _ExitAwareProtocol) -> int:
    await protocol.exited
    code = process.returncode
    return -1 if code is None else code


class _Child:
    """One running service: its process, its output pump, the URL it announced."""

    def __init__(self, spec: ServiceSpec, process: _Process, exit_code: Awaitable[int]) -> None:
        self.spec = spec
        self.process = process
        self.began = time.monotonic()
        self.last_lines: deque[str] = deque(maxlen=_KEPT_LINES)
        self.listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.spoke = asyncio.Event()  # set on each line it prints
        self.exited: asyncio.Task[int] = asyncio.create_task(self._exit_code(exit_code))
        self.url: str | None = None
        self.ready = False
        self.pump: asyncio.Task[None] | None = None

    @staticmethod
    async def _exit_code(exit_code: Awaitable[int]) -> int:
        return await exit_code

    @property
    def name(self) -> str:
        return self.spec.name

    async def drained(self, timeout_s: float, *, give_up: bool = False) -> None:
        """Give the output pump time to print the last lines (a traceback) of a dead child."""
        if self.pump is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.pump), timeout_s)
        except TimeoutError:
            # Something that left the service's process group still holds the pipe.
            if give_up:
                self.pump.cancel()


class Supervisor:
    """Runs a table of services, all at once when the registry's port is known up front
    (modules forked by the zygote, commands exec'd); stops them registry last.

    ``start()`` returns when every service answered 200 on ``/health/ready``, or raises
    ``ServiceFailed`` after stopping whatever it had started (fail-fast). ``wait()`` then
    restarts a service that exits on its own (``restart``: backoff and limit), and returns the
    failure it gives up on (the limit, a refused configuration, the fork server gone, a
    restart never ready), or ``None`` once ``stop()`` is called.
    """

    def __init__(
        self,
        services: Sequence[ServiceSpec],
        *,
        environment: Mapping[str, str],
        console: Console,
        ready_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
        zygote: Zygote | None = None,
        restart: RestartPolicy | None = None,
    ) -> None:
        """``zygote``: a fork server already importing (``shop up`` starts it first thing);
        the supervisor closes it when it stops. Without one it starts its own if needed.
        ``restart``: when ``wait()`` restarts a crashed service (default ``RestartPolicy()``)."""
        check_table(services)
        self._services = list(services)
        self._environment = dict(environment)
        # Everything runs on one machine: a heartbeat every 5 s and a 15 s lease (Eureka's are
        # 30 and 90) let a dead instance leave the registry, and a restarted registry learn
        # every service again, within seconds (docs/registry.md). The operator's values win.
        self._environment.setdefault("SHOP_HEARTBEAT_INTERVAL_S", "5")
        self._environment.setdefault("SHOP_LEASE_DURATION_S", "15")
        # Only the registry sees every credential; each service gets its own, in its URL.
        self._clients = registry_clients(self._environment)
        for name in (REGISTRY_CLIENTS, REGISTRY_CLIENTS_FILE):
            self._environment.pop(name, None)
        if self._clients:
            for spec in self._services:
                if spec.registers_as and spec.registers_as.lower() not in self._clients:
                    raise ValueError(
                        f"{REGISTRY_CLIENTS} has no credential for {spec.registers_as}: {spec.name}"
                        " could not register, so nothing was started"
                    )
        # Likewise only auth sees every service secret; each internal caller gets its own,
        # and a service that makes no internal call gets none.
        self._service_clients = service_clients(self._environment)
        for name in (SERVICE_CLIENTS, SERVICE_SECRET):
            self._environment.pop(name, None)
        if self._service_clients:
            for spec in self._services:
                caller = (spec.registers_as or "").lower()
                if spec.calls_internal and caller not in self._service_clients:
                    raise ValueError(
                        f"{SERVICE_CLIENTS} has no secret for {caller}: {spec.name} could not"
                        " call its peers, so nothing was started"
                    )
        self._console = console
        self._ready_timeout_s = ready_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._stages: list[list[_Child]] = []
        self._registry_url: str | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._hurry = asyncio.Event()
        self._preexec = die_with_launcher()
        self._zygote = zygote
        self._restart = restart or RestartPolicy()
        # Restarts being spawned: stop() lets them finish, then stops what they started.
        self._respawns: set[asyncio.Task[_Child]] = set()

    # -- what callers learn ------------------------------------------------------------

    @property
    def urls(self) -> dict[str, str]:
        return {c.name: c.url for stage in self._stages for c in stage if c.url}

    def url(self, name: str) -> str:
        try:
            return self.urls[name]
        except KeyError:
            raise KeyError(f"{name} is not running (running: {', '.join(self.urls)})") from None

    @property
    def pids(self) -> dict[str, int]:
        return {c.name: c.process.pid for stage in self._stages for c in stage}

    def url_of_role(self, role: str) -> str | None:
        for stage in self._stages:
            for child in stage:
                if child.spec.role == role and child.url:
                    return child.url
        return None

    # -- start ---------------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._stages:
            raise RuntimeError("a Supervisor starts once")
        self._pin_auth()
        self._pin_registry()
        registry = [s for s in self._services if s.role == "registry"]
        gateway = [s for s in self._services if s.role == "gateway"]
        rest = [s for s in self._services if s.role in ("auth", "service")]
        # Stages say the stopping order (the registry last). With the registry's port known in
        # advance they all start at once: the services retry their registration until the
        # registry answers. Otherwise the registry starts alone and the rest once it is ready.
        waves = [[registry, gateway, rest]]
        if registry and not registry[0].port:
            waves = [[registry], [gateway, rest]]
        try:
            self._start_zygote()
            for wave in waves:
                await self._start_wave(wave)
                if self._registry_url is None and registry:
                    self._registry_url = f"{self._stages[0][0].url}/eureka"
        except ServiceFailed as failure:
            self._report(failure)
            await self.stop()
            raise
        except BaseException:
            # Cancelled (a signal during start-up) or a bug: leave no process behind.
            await self.stop()
            raise

    def _pin_registry(self) -> None:
        """The registry's port up front (a free one for port 0, when the registry is told its
        port), so that every process can be told its URL before it starts."""
        for index, spec in enumerate(self._services):
            if spec.role != "registry":
                continue
            if not spec.port and spec.port_env:
                self._services[index] = spec = replace(spec, port=_free_port("127.0.0.1"))
            if spec.port:
                self._registry_url = f"http://127.0.0.1:{spec.port}/eureka"

    def _start_zygote(self) -> None:
        """The fork server, when some service is a module: it imports while the launcher waits."""
        wanted = any(s.module for s in self._services) and fork_server_wanted(self._environment)
        if not wanted:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None
            return
        if self._zygote is not None:
            return
        try:
            self._zygote = Zygote.begin(self._environment, limit=_LINE_LIMIT)
        except OSError as exc:
            self._console.note(f"no fork server ({exc.strerror or exc}): starting each service")

    def _pin_auth(self) -> None:
        """Give auth its port now and every process its address: verifiers fetch the JWKS
        there and callers their service tokens, never from whatever the registry lists.
        Addresses the operator gave (SHOP_JWKS_URL, SHOP_AUTH_URL) are kept."""
        for index, spec in enumerate(self._services):
            if spec.role != "auth":
                continue
            host = self._environment.get("AUTH_HOST", "").strip() or "127.0.0.1"
            host = _WILDCARDS.get(host, host).strip("[]")
            port = spec.port or _free_port(host)
            self._services[index] = replace(spec, port=port)
            scheme = "https" if self._environment.get("SHOP_TLS_CERTFILE") else "http"
            base = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
            if not self._environment.get("SHOP_AUTH_URL", "").strip():
                self._environment["SHOP_AUTH_URL"] = base
            if not self._environment.get("SHOP_JWKS_URL", "").strip():
                self._environment["SHOP_JWKS_URL"] = base + JWKS_PATH

    async def _spawn(self, spec: ServiceSpec) -> _Child:
        env = dict(self._environment)
        if spec.port_env:
            env[spec.port_env] = str(spec.port)
        if spec.role == "auth" and self._service_clients:
            env[SERVICE_CLIENTS] = json.dumps(self._service_clients)
        secret = self._service_clients.get((spec.registers_as or "").lower())
        if spec.calls_internal and secret:
            env[SERVICE_SECRET] = secret
        if spec.role == "registry" and self._clients:
            env[REGISTRY_CLIENTS] = json.dumps(self._clients)
        # The registry registers with nobody: it is not told where it is.
        if self._registry_url and spec.role != "registry":
            url = self._registry_url
            secret = self._clients.get(spec.registers_as.lower()) if spec.registers_as else None
            if spec.registers_as and secret:
                url = with_credentials(url, app=spec.registers_as, secret=secret)
            env["SHOP_REGISTRY_URL"] = url
            if spec.role == "gateway":
                # The dashboard is read without credentials; left to default, it would be the
                # URL above, secret included, wherever the gateway names its upstream.
                env.setdefault(
                    "GATEWAY_REGISTRY_DASHBOARD_URL", self._registry_url.removesuffix("/eureka")
                )
        process: _Process
        exit_code: Awaitable[int]
        try:
            if self._zygote is not None and spec.module:
                forked = await self._zygote.fork(spec.module, env=env)
                process, exit_code = forked, forked.exited
            else:
                spawned, protocol = await _spawn_process(
                    spec.argv(), env=env, preexec_fn=self._preexec
                )
                process, exit_code = spawned, _exit_code_of(spawned, protocol)
        except OSError as exc:
            raise ServiceFailed(
                spec.name,
                reason=f"could not be started ({spec.describe()}: {exc.strerror or exc})",
                exit_code=None,
                last_lines=(),
            ) from exc
        child = _Child(spec, process, exit_code)
        child.pump = asyncio.create_task(self._pump(child))
        self._console.note(f"started {spec.name} (pid {process.pid}): {spec.describe()}")
        return child

    async def _pump(self, child: _Child) -> None:
        """Relay what the child prints, a read at a time: every whole line a read brings is
        written out in one write (under load a service prints a few lines per order, and a
        write and a flush per line were the launcher's main cost)."""
        stream = child.process.stdout
        if stream is None:
            return
        lines = LineSplitter()
        while chunk := await stream.read(_READ_SIZE):
            if whole := lines.feed(chunk):
                self._relay(child, whole)
        if rest := lines.end():
            self._relay(child, rest)

    def _relay(self, child: _Child, lines: list[str]) -> None:
        child.last_lines.extend(lines)
        child.spoke.set()
        self._console.service_lines(child.name, lines)
        if not child.listening.done():
            for line in lines:
                url = parse_listening(line)
                if url is not None:
                    child.listening.set_result(url)
                    break

    async def _start_wave(self, stages: Sequence[Sequence[ServiceSpec]]) -> None:
        """Start these stages' services together; return when every one is ready."""
        earlier = [c for stage in self._stages for c in stage]
        wave: list[_Child] = []
        for specs in stages:
            if not specs:
                continue
            stage: list[_Child] = []
            # Registered before readiness, so that stop() reaches a child however start ends.
            self._stages.append(stage)
            for spec in specs:
                stage.append(await self._spawn(spec))
            wave += stage
        readiness = [asyncio.create_task(self._become_ready(c)) for c in wave]
        pending: set[asyncio.Task[None]] = set(readiness)
        pending.add(asyncio.create_task(self._raise_when_a_ready_one_exits([*earlier, *wave])))
        try:
            while not all(t.done() for t in readiness):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception()
                    if error is not None:
                        raise error
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for child in (*earlier, *wave):
            if child.exited.done():
                raise await self._failure(child, "exited unexpectedly")

    async def _raise_when_a_ready_one_exits(self, children: Sequence[_Child]) -> None:
        """A child not ready yet that exits is its readiness check's to report."""
        waiting = {c.exited: c for c in children}
        while waiting:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for exited in done:
                child = waiting.pop(exited)
                if child.ready:
                    raise await self._failure(child, "exited unexpectedly")
        await asyncio.Event().wait()  # every one has ended: the readiness checks say how

    async def _become_ready(self, child: _Child) -> None:
        last_answer = "no answer"
        try:
            async with asyncio.timeout(self._ready_timeout_s):
                announced: set[asyncio.Future[Any]] = {child.listening, child.exited}
                await asyncio.wait(announced, return_when=asyncio.FIRST_COMPLETED)
                if not child.listening.done():
                    raise await self._failure(child, "exited before it announced its port")
                child.url = child.listening.result()
                delay = _FIRST_POLL_S
                while True:
                    child.spoke.clear()  # a line printed while it is being asked counts
                    last_answer = await asyncio.to_thread(_probe, f"{child.url}/health/ready")
                    if last_answer == "200":
                        break
                    if child.exited.done():
                        raise await self._failure(child, "exited before it was ready")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(child.spoke.wait(), delay)
                    delay = min(delay * 2, _LAST_POLL_S)
        except TimeoutError:
            limit = f"{self._ready_timeout_s:g} s"
            if child.url is None:
                reason = f"did not announce 'listening on http://...' within {limit}"
            else:
                reason = (
                    f"was not ready within {limit} (GET {child.url}/health/ready: {last_answer})"
                )
            raise await self._failure(child, reason) from None
        child.ready = True
        took = time.monotonic() - child.began
        self._console.note(f"{child.name} is ready at {child.url} ({took:.1f} s)")

    async def _failure(self, child: _Child, reason: str) -> ServiceFailed:
        code = child.process.returncode
        if code is not None:
            await child.drained(1.0)
            reason = f"{reason} ({describe_exit(code)})"
        return ServiceFailed(child.name, reason=reason, exit_code=code, last_lines=child.last_lines)

    def _report(self, failure: ServiceFailed) -> None:
        shown = failure.last_lines[-_SHOWN_LINES:]
        details = [f"last output of {failure.name}:", *(f"  {line}" for line in shown)]
        if not shown:
            details = [f"{failure.name} printed nothing"]
        self._console.banner(f"{failure.name} {failure.reason}: stopping every service", details)

    # -- run -----------------------------------------------------------------------------

    async def wait(self) -> ServiceFailed | None:
        """Keep every service running until ``stop()`` is called (``None``): one that exits on
        its own is restarted, after a backoff, and asked ``/health/ready`` again. Returns the
        failure it gives up on, reported in a banner; the caller then stops everything."""
        slots = [(stage, index) for stage in self._stages for index in range(len(stage))]
        if not slots:
            return None
        keepers = {asyncio.create_task(self._keep(stage, index)) for stage, index in slots}
        stopping = asyncio.create_task(self._stop_requested.wait())
        failure: ServiceFailed | None = None
        try:
            pending = {*keepers, stopping}
            while failure is None and not self._stop_requested.is_set():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done & keepers:
                    error = task.exception()
                    if isinstance(error, ServiceFailed):
                        failure = error
                    elif error is not None:
                        raise error
        finally:
            for task in (*keepers, stopping):
                task.cancel()
            await asyncio.gather(*keepers, stopping, return_exceptions=True)
        if failure is None or self._stop_requested.is_set():
            return None
        self._report(failure)
        return failure

    async def _keep(self, stage: list[_Child], index: int) -> None:
        """One service's place in the table: restart it each time it exits unasked. Returns once
        stop() is called; raises the ServiceFailed that ends the Shop."""
        budget = RestartBudget(self._restart)
        table_port = stage[index].spec.port
        while True:
            child = stage[index]
            # Shielded: cancelling the keeper must not cancel what stop() waits on.
            code = await asyncio.shield(child.exited)
            if self._stop_requested.is_set():
                return
            if self._zygote is not None and child.spec.module and not self._zygote.alive:
                ended = await asyncio.to_thread(self._zygote.exit_code, 1.0)
                zygote = "gone" if ended is None else describe_exit(ended)
                raise await self._failure(
                    child,
                    f"exited with the fork server (pid {self._zygote.pid}, {zygote}), which"
                    " took every service it forked along",
                )
            if code == EXIT_REFUSED:
                raise await self._failure(child, "refused its settings and is not restarted")
            delay = budget.crashed()
            policy = self._restart
            if delay is None:
                if not policy.limit:
                    raise await self._failure(child, "exited unexpectedly")
                raise await self._failure(
                    child, f"crashed {budget.crashes} times within {policy.window_s:g} s"
                )
            # What the dead instance started goes with it, as when it is stopped.
            _signal_group(child.process.pid, signal.SIGKILL)
            await child.drained(1.0)
            self._console.note(
                f"{child.name} crashed ({describe_exit(code)}): restarting it in {delay:g} s"
                f" (restart {budget.crashes} of at most {policy.limit}"
                f" within {policy.window_s:g} s)"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            if self._stop_requested.is_set():
                return
            # The port it had: callers and the registry's entry (whose id is host:app:port) stay
            # right. If it could not even announce a port, maybe someone else took it: any.
            spec = child.spec
            if spec.port_env:
                spec = replace(spec, port=_port_of(child.url) if child.url else table_port)
            respawn = asyncio.create_task(self._respawn(stage, index, spec))
            self._respawns.add(respawn)
            respawn.add_done_callback(self._respawns.discard)
            # Shielded: a cancelled wait() must not leave a started process out of the table.
            child = await asyncio.shield(respawn)
            try:
                await self._become_ready(child)
            except ServiceFailed:
                if not child.exited.done():
                    raise  # alive but never ready: as at start-up, that ends the Shop
                # It exited before it was ready: one more crash, counted as such.

    async def _respawn(self, stage: list[_Child], index: int, spec: ServiceSpec) -> _Child:
        child = await self._spawn(spec)
        stage[index] = child
        return child

    # -- stop ----------------------------------------------------------------------------

    def hurry(self) -> None:
        """Do not wait the grace period any more: SIGKILL what is still running (second Ctrl-C)."""
        self._hurry.set()

    async def stop(self) -> None:
        """Stop every service, last started first; idempotent, safe to call concurrently."""
        self._stop_requested.set()
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop_all())
        await asyncio.shield(self._stopping)

    async def _stop_all(self) -> None:
        # A restart being spawned is let finish, so that what it started is stopped too.
        await asyncio.gather(*self._respawns, return_exceptions=True)
        running = [c for stage in self._stages for c in stage if c.process.returncode is None]
        if running:
            self._console.note(f"stopping {', '.join(c.name for c in reversed(running))}")
        # Registry last: the others deregister from it on their way out.
        for stage in reversed(self._stages):
            await asyncio.gather(*(self._stop_child(c) for c in stage))
        if self._zygote is not None:
            self._zygote.close()

    async def _stop_child(self, child: _Child) -> None:
        pid = child.process.pid
        if child.process.returncode is None:
            _signal_group(pid, signal.SIGTERM)
            hurry = asyncio.create_task(self._hurry.wait())
            done, _ = await asyncio.wait(
                {child.exited, hurry},
                timeout=self._stop_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            hurry.cancel()
            if child.exited not in done:
                self._console.note(
                    f"{child.name} did not stop within {self._stop_timeout_s:g} s: killing it"
                )
                _signal_group(pid, signal.SIGKILL)
            code = await child.exited
            # uvicorn re-raises the SIGTERM it handled, so -SIGTERM is a graceful end too.
            clean = code in (0, -signal.SIGTERM) and child.exited in done
            self._console.note(
                f"{child.name} stopped {'cleanly' if clean else f'({describe_exit(code)})'}"
            )
        # Whatever the service started in its group goes with it.
        _signal_group(pid, signal.SIGKILL)
        await child.drained(2.0, give_up=True)


def shop_system(
    *,
    data_dir: Path,
    registry_port: int = 0,
    gateway_port: int = 0,
    services: Sequence[ServiceSpec] = SERVICES,
    extra_environment: Mapping[str, str] | None = None,
    ready_timeout_s: float = 60.0,
    stop_timeout_s: float = 10.0,
    output: TextIO | None = None,
    restart: RestartPolicy | None = None,
) -> Supervisor:
    """The whole Shop on the embedded profile, for end-to-end tests: ``async with`` it.

    Ports default to 0 (any free one); read them back with ``url("gateway")``.
    ``extra_environment`` is added to this process's environment for every service;
    ``restart`` says when ``wait()`` restarts a crashed one.
    """
    table = with_ports(services, registry=registry_port, gateway=gateway_port)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = child_environment(
        {**os.environ, **(extra_environment or {})},
        data_dir=data_dir,
        profile="embedded",
        registrants=[s.registers_as for s in table if s.registers_as],
        internal_callers=[s.registers_as for s in table if s.registers_as and s.calls_internal],
    )
    console = Console(output or sys.stdout, names=[LAUNCHER, *(s.name for s in table)])
    return Supervisor(
        table,
        environment=env,
        console=console,
        ready_timeout_s=ready_timeout_s,
        stop_timeout_s=stop_timeout_s,
        restart=restart,
    )
