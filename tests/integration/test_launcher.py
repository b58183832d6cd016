"""The launcher with real processes: small stand-in services written into tmp_path.

Each stand-in binds a port, prints the ``<name> listening on http://...`` line the
platform's ``serve`` prints, and answers ``/health/ready``; its argv picks a misbehaviour.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

from shop.launcher import ServiceFailed, ServiceSpec, Supervisor, shop_system
from shop.launcher import supervisor as supervisor_module
from shop.launcher.console import Console
from shop.launcher.services import with_ports
from shop.launcher.settings import child_environment
from shop.launcher.supervisor import RestartPolicy
from tests.support import free_port

STAND_IN = r"""
import http.server, os, re, signal, subprocess, sys, threading, time, urllib.request

name, mode = sys.argv[1], sys.argv[2]
port_env = sys.argv[3] if len(sys.argv) > 3 else ""
port = int(os.environ[port_env]) if port_env else 0
data_dir = os.environ["SHOP_DATA_DIR"]

print(f"{name} starting: profile={os.environ.get('SHOP_PROFILE')} data={data_dir}")
print(f"{name} registry url: {os.environ.get('SHOP_REGISTRY_URL', '-')}")
print(f"{name} registry clients: {os.environ.get('REGISTRY_CLIENTS', '-')}")
for variable in ("SHOP_JWKS_URL", "SHOP_AUTH_URL", "SHOP_SERVICE_SECRET", "AUTH_SERVICE_CLIENTS"):
    print(f"{name} {variable}: {os.environ.get(variable, '-')}")
with open(os.path.join(data_dir, name + ".starts"), "a") as starts:
    starts.write("started\n")

registry = os.environ.get("SHOP_REGISTRY_URL")
if registry and name != "registry":
    # urllib takes no credentials in a URL: the health check needs none.
    health = re.sub(r"//[^/@]*@", "//", registry.removesuffix("/eureka")) + "/health/ready"
    # Started together with the registry, like the real services it retries until it answers.
    for attempt in range(200):
        try:
            with urllib.request.urlopen(health) as answer:
                print(f"{name} found the registry ready: {answer.status}")
                break
        except OSError:
            time.sleep(0.05)

if mode == "crash-at-start":
    print(f"boom: {name} cannot open its database", file=sys.stderr)
    sys.exit(3)

def stop(signum, frame):
    print(f"{name} stopping")
    sys.exit(0)

signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else stop)

if mode == "silent":
    time.sleep(120)

if mode == "grandchild":
    # Ignores SIGTERM: only the launcher's SIGKILL of the whole group can end it.
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('ignoring SIGTERM', flush=True); time.sleep(120)"
    )
    grandchild = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    print(f"{name} grandchild pid {grandchild.pid}: {grandchild.stdout.readline().decode()}")

ready = threading.Event()
if mode != "ready-later":
    ready.set()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/health/ready":
            status = 404
        else:
            status = 200 if ready.is_set() and mode != "never-ready" else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
print(f"{name} listening on http://127.0.0.1:{server.server_address[1]}")

if mode == "crash-on-request":
    trigger = os.path.join(data_dir, name + ".crash")
    def crash_when_asked():
        while not os.path.exists(trigger):
            time.sleep(0.02)
        with open(trigger) as told:
            code = int(told.read().strip() or 4)  # the exit code the test asks for, else 4
        print(f"{name} lost its database", file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)
    threading.Thread(target=crash_when_asked, daemon=True).start()

if mode == "ready-later":
    # Ready a moment after it listens (migrations, registration...), and says so.
    def become_ready():
        time.sleep(0.3)
        ready.set()
        print(f"{name} is ready now", flush=True)
    threading.Thread(target=become_ready, daemon=True).start()

server.serve_forever()
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    path = tmp_path / "stand_in.py"
    path.write_text(STAND_IN)
    return path


def table(
    stand_in: Path,
    *,
    auth: str = "ok",
    gateway: str = "ok",
    registry: str = "ok",
    registers: bool = False,
) -> list[ServiceSpec]:
    """The real table's shape (registry, gateway, auth) with stand-ins in place of services."""

    def command(name: str, mode: str, port_env: str = "") -> tuple[str, ...]:
        return (sys.executable, str(stand_in), name, mode, *([port_env] if port_env else []))

    return [
        ServiceSpec(
            name="registry",
            command=command("registry", registry, "REGISTRY_PORT"),
            port_env="REGISTRY_PORT",
            role="registry",
        ),
        ServiceSpec(
            name="gateway",
            command=command("gateway", gateway, "GATEWAY_PORT"),
            port_env="GATEWAY_PORT",
            role="gateway",
            registers_as="api-gateway" if registers else None,
        ),
        ServiceSpec(
            name="auth",
            command=command("auth", auth),
            registers_as="auth-service" if registers else None,
        ),
    ]


def alive(pid: int) -> bool:
    """Running, per /proc; a zombie nobody has reaped yet counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


async def eventually_gone(pids: Sequence[int], *, within_s: float = 5.0) -> list[int]:
    for _ in range(int(within_s / 0.05)):
        if not any(alive(p) for p in pids):
            return []
        await asyncio.sleep(0.05)
    return [p for p in pids if alive(p)]


def supervisor(
    services: Sequence[ServiceSpec],
    *,
    data_dir: Path,
    output: io.StringIO,
    ready_timeout_s: float = 15.0,
    stop_timeout_s: float = 5.0,
    restart: RestartPolicy | None = None,
) -> Supervisor:
    data_dir.mkdir(parents=True, exist_ok=True)
    environment = child_environment(
        {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_CLIENTS")},
        data_dir=data_dir,
        profile="embedded",
        registrants=[s.registers_as for s in services if s.registers_as],
    )
    return Supervisor(
        services,
        environment=environment,
        console=Console(output, names=[s.name for s in services], colour=False),
        ready_timeout_s=ready_timeout_s,
        stop_timeout_s=stop_timeout_s,
        restart=restart,
    )


def get_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - our own test URL
        status: int = answer.status
        return status


# -- the supervisor, in process ------------------------------------------------------------


async def test_starts_registry_first_then_the_rest_and_learns_their_ports(
    stand_in: Path, tmp_path: Path
) -> None:
    output = io.StringIO()
    data_dir = tmp_path / "data"
    gateway_port = free_port()
    services = with_ports(table(stand_in), gateway=gateway_port)
    async with supervisor(services, data_dir=data_dir, output=output) as shop:
        urls = shop.urls
        pids = list(shop.pids.values())
        assert set(urls) == {"registry", "gateway", "auth"}
        assert urls["gateway"] == f"http://127.0.0.1:{gateway_port}"
        for url in urls.values():
            assert await asyncio.to_thread(get_status, f"{url}/health/ready") == 200
    assert await eventually_gone(pids, within_s=0.5) == []

    text = output.getvalue()
    registry_url = f"{urls['registry']}/eureka"
    # The others were started only once the registry answered, and were told where it is.
    assert f"gateway      | gateway registry url: {registry_url}" in text
    assert "auth         | auth found the registry ready: 200" in text
    assert "registry     | registry registry url: -" in text
    assert f"auth         | auth starting: profile=embedded data={data_dir.resolve()}" in text
    # Stopped in reverse: the registry goes last.
    stops = [line for line in text.splitlines() if re.search(r"\| \w+ stopped cleanly", line)]
    assert [line.split()[2] for line in stops][-1] == "registry"
    assert len(stops) == 3


async def test_each_service_gets_its_own_registry_credential_and_the_registry_all(
    stand_in: Path, tmp_path: Path
) -> None:
    output = io.StringIO()
    services = with_ports(table(stand_in, registers=True), gateway=free_port())
    async with supervisor(services, data_dir=tmp_path / "data", output=output) as shop:
        registry_url = f"{shop.url('registry')}/eureka"
    text = output.getvalue()

    given_to_registry = re.search(r"registry registry clients: (.*)", text)
    assert given_to_registry is not None
    clients = json.loads(given_to_registry[1])
    assert set(clients) == {"api-gateway", "auth-service"}
    assert len(set(clients.values())) == 2 and all(len(s) >= 32 for s in clients.values())
    for name, app in (("gateway", "api-gateway"), ("auth", "auth-service")):
        given = registry_url.replace("http://", f"http://{app}:{clients[app]}@")
        assert f"| {name} registry url: {given}" in text
        assert f"| {name} registry clients: -" in text, "a service sees no other's secret"
    assert "auth found the registry ready: 200" in text


async def test_an_operators_clients_without_a_services_entry_start_nothing(
    stand_in: Path, tmp_path: Path
) -> None:
    environment = child_environment(
        {"REGISTRY_CLIENTS": json.dumps({"api-gateway": "g" * 32})},
        data_dir=tmp_path,
        profile="embedded",
        registrants=["api-gateway", "auth-service"],
    )
    with pytest.raises(ValueError, match="no credential for auth-service") as refused:
        Supervisor(
            table(stand_in, registers=True),
            environment=environment,
            console=Console(io.StringIO(), names=["auth"], colour=False),
        )
    assert "g" * 32 not in str(refused.value)


async def test_auth_is_pinned_and_only_internal_callers_get_their_own_secret(
    stand_in: Path, tmp_path: Path
) -> None:
    def command(name: str, port_env: str = "") -> tuple[str, ...]:
        return (sys.executable, str(stand_in), name, "ok", *([port_env] if port_env else []))

    services = [
        ServiceSpec(
            name="registry",
            command=command("registry", "REGISTRY_PORT"),
            port_env="REGISTRY_PORT",
            role="registry",
        ),
        ServiceSpec(
            name="auth",
            command=command("auth", "AUTH_PORT"),
            port_env="AUTH_PORT",
            role="auth",
            registers_as="auth-service",
        ),
        ServiceSpec(
            name="order",
            command=command("order"),
            registers_as="order-service",
            calls_internal=True,
        ),
        ServiceSpec(name="notification", command=command("notification"), registers_as="n-service"),
    ]
    output = io.StringIO()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    environment = child_environment(
        {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_CLIENTS", "SHOP_"))}
        | {"SHOP_SERVICE_SECRET": "a-shared-secret-from-before"},
        data_dir=data_dir,
        profile="embedded",
        registrants=["auth-service", "order-service", "n-service"],
        internal_callers=["order-service"],
    )
    shop = Supervisor(
        services,
        environment=environment,
        console=Console(output, names=[s.name for s in services], colour=False),
        ready_timeout_s=15.0,
    )
    async with shop:
        auth_url = shop.url("auth")
    text = output.getvalue()

    def told(name: str, variable: str) -> str:
        found = re.search(rf"\| {name} {variable}: (.*)", text)
        assert found is not None, (name, variable)
        return found[1]

    # Auth listens where everyone was told before it started, registry or not.
    for name in ("registry", "auth", "order", "notification"):
        assert told(name, "SHOP_AUTH_URL") == auth_url
        assert told(name, "SHOP_JWKS_URL") == f"{auth_url}/auth/.well-known/jwks.json"
    clients = json.loads(told("auth", "AUTH_SERVICE_CLIENTS"))
    assert set(clients) == {"order-service"} and len(clients["order-service"]) >= 32
    assert told("order", "SHOP_SERVICE_SECRET") == clients["order-service"]
    for name in ("registry", "notification"):
        assert told(name, "SHOP_SERVICE_SECRET") == "-", "no credential it does not use"
        assert told(name, "AUTH_SERVICE_CLIENTS") == "-"
    assert told("order", "AUTH_SERVICE_CLIENTS") == "-", "a caller sees no other's secret"
    assert "a-shared-secret-from-before" not in text


async def test_data_survives_a_restart(stand_in: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    for _ in range(2):
        async with supervisor(table(stand_in), data_dir=data_dir, output=io.StringIO()):
            pass
    assert (data_dir / "auth.starts").read_text() == "started\nstarted\n"


async def test_a_crash_at_start_names_the_service_and_stops_the_others(
    stand_in: Path, tmp_path: Path
) -> None:
    output = io.StringIO()
    shop = supervisor(table(stand_in, auth="crash-at-start"), data_dir=tmp_path, output=output)
    with pytest.raises(ServiceFailed) as failed:
        await shop.start()
    assert failed.value.name == "auth"
    assert failed.value.exit_code == 3
    assert "boom: auth cannot open its database" in failed.value.last_lines
    assert await eventually_gone(list(shop.pids.values()), within_s=0.5) == []
    text = output.getvalue()
    assert "!! auth exited before it announced its port (exit code 3)" in text
    assert "!!   boom: auth cannot open its database" in text
    assert "registry stopped cleanly" in text
    assert "gateway stopped cleanly" in text


async def test_a_service_that_never_becomes_ready_times_out(stand_in: Path, tmp_path: Path) -> None:
    output = io.StringIO()
    shop = supervisor(
        table(stand_in, gateway="never-ready"),
        data_dir=tmp_path,
        output=output,
        ready_timeout_s=1.0,
    )
    began = time.monotonic()
    with pytest.raises(ServiceFailed) as failed:
        await shop.start()
    assert time.monotonic() - began < 5
    assert failed.value.name == "gateway"
    assert "was not ready within 1 s" in failed.value.reason
    assert "/health/ready: 503" in failed.value.reason
    assert await eventually_gone(list(shop.pids.values()), within_s=0.5) == []
    assert "!! gateway was not ready within 1 s" in output.getvalue()


async def test_readiness_is_asked_again_as_soon_as_the_service_prints_a_line(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polling alone would ask again only after 30 s, far past the 10 s allowed.
    monkeypatch.setattr(supervisor_module, "_FIRST_POLL_S", 30.0)
    monkeypatch.setattr(supervisor_module, "_LAST_POLL_S", 30.0)
    output = io.StringIO()
    shop = supervisor(
        table(stand_in, auth="ready-later"), data_dir=tmp_path, output=output, ready_timeout_s=10.0
    )
    began = time.monotonic()
    async with shop:
        assert time.monotonic() - began < 5
        assert await asyncio.to_thread(get_status, f"{shop.url('auth')}/health/ready") == 200
    text = output.getvalue()
    assert text.index("auth is ready now") < text.index("auth is ready at")


async def test_a_service_that_never_announces_its_port_times_out(
    stand_in: Path, tmp_path: Path
) -> None:
    shop = supervisor(
        table(stand_in, auth="silent"), data_dir=tmp_path, output=io.StringIO(), ready_timeout_s=1.0
    )
    with pytest.raises(ServiceFailed) as failed:
        await shop.start()
    assert failed.value.name == "auth"
    assert "did not announce 'listening on http://...' within 1 s" in failed.value.reason
    assert await eventually_gone(list(shop.pids.values()), within_s=0.5) == []


async def test_without_restarts_a_crash_after_start_is_reported_by_wait(
    stand_in: Path, tmp_path: Path
) -> None:
    output = io.StringIO()
    async with supervisor(
        table(stand_in, auth="crash-on-request"),
        data_dir=tmp_path,
        output=output,
        restart=RestartPolicy(limit=0),
    ) as shop:
        (tmp_path / "auth.crash").touch()
        failure = await asyncio.wait_for(shop.wait(), 5)
    assert failure is not None
    assert failure.name == "auth"
    assert failure.exit_code == 4
    assert "auth lost its database" in failure.last_lines
    assert "!! auth exited unexpectedly (exit code 4): stopping every service" in output.getvalue()


async def test_wait_returns_nothing_once_stopped(stand_in: Path, tmp_path: Path) -> None:
    async with supervisor(table(stand_in), data_dir=tmp_path, output=io.StringIO()) as shop:
        waiting = asyncio.create_task(shop.wait())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await shop.stop()
        assert await asyncio.wait_for(waiting, 2) is None


async def test_a_service_ignoring_sigterm_is_killed_after_the_grace_period(
    stand_in: Path, tmp_path: Path
) -> None:
    output = io.StringIO()
    async with supervisor(
        table(stand_in, auth="stubborn"), data_dir=tmp_path, output=output, stop_timeout_s=0.5
    ) as shop:
        pid = shop.pids["auth"]
    assert not alive(pid)
    text = output.getvalue()
    assert "auth did not stop within 0.5 s: killing it" in text
    assert "auth stopped (killed by SIGKILL)" in text


async def test_what_a_service_started_is_stopped_with_it(stand_in: Path, tmp_path: Path) -> None:
    output = io.StringIO()
    async with supervisor(table(stand_in, auth="grandchild"), data_dir=tmp_path, output=output):
        match = re.search(r"auth grandchild pid (\d+)", output.getvalue())
        assert match is not None
        grandchild = int(match.group(1))
        assert alive(grandchild)
    assert await eventually_gone([grandchild], within_s=2) == []


async def test_a_command_that_cannot_run_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    missing = ServiceSpec(name="ghost", command=(str(tmp_path / "no-such-program"),))
    shop = supervisor([missing], data_dir=tmp_path, output=io.StringIO())
    with pytest.raises(ServiceFailed, match="ghost could not be started"):
        await shop.start()


async def test_shop_system_reports_no_url_for_a_service_that_is_not_running(
    stand_in: Path, tmp_path: Path
) -> None:
    async with shop_system(
        data_dir=tmp_path, services=table(stand_in), output=io.StringIO()
    ) as shop:
        assert shop.url("gateway").startswith("http://127.0.0.1:")
        with pytest.raises(KeyError, match="product is not running"):
            shop.url("product")


# -- `shop up` as a real process -----------------------------------------------------------


def services_file(tmp_path: Path, services: Sequence[ServiceSpec]) -> Path:
    path = tmp_path / "services.json"
    rows = [
        {
            "name": s.name,
            "command": list(s.command),
            "port": s.port,
            "port_env": s.port_env,
            "role": s.role,
        }
        for s in services
    ]
    path.write_text(json.dumps(rows))
    return path


class ShopUp:
    """``python -m shop.launcher.cli up`` running, its output read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def read_until(self, marker: str, *, within_s: float = 20.0) -> None:
        assert self.process.stdout is not None
        async with asyncio.timeout(within_s):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError(f"{marker!r} never came:\n" + "\n".join(self.lines))
                self.lines.append(raw.decode().rstrip("\n"))
                if marker in self.lines[-1]:
                    return

    async def finish(self, *, within_s: float = 20.0) -> int:
        assert self.process.stdout is not None
        async with asyncio.timeout(within_s):
            rest = await self.process.stdout.read()
            self.lines += rest.decode().splitlines()
            return await self.process.wait()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def children(self) -> dict[str, int]:
        return {
            m["name"]: int(m["pid"])
            for m in re.finditer(r"started (?P<name>\w+) \(pid (?P<pid>\d+)\)", self.text)
        }


async def shop_up(tmp_path: Path, *args: str) -> ShopUp:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOP_", "AUTH_"))}
    env |= {"AUTH_ADMIN_EMAIL": "boss@shop.test", "AUTH_ADMIN_PASSWORD": "boss-password"}
    env.pop("REGISTRY_PORT", None)
    env.pop("GATEWAY_PORT", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shop.launcher.cli",
        "up",
        *args,
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    return ShopUp(process)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_shop_up_prints_where_everything_is_and_stops_cleanly_on_a_signal(
    stand_in: Path, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    gateway_port = free_port()
    up = await shop_up(
        tmp_path,
        "--services-file",
        str(services_file(tmp_path, table(stand_in))),
        "--registry-port",
        "0",
        "--gateway-port",
        str(gateway_port),
    )
    await up.read_until("Press Ctrl-C to stop.")
    children = up.children
    assert set(children) == {"registry", "gateway", "auth"}
    assert all(alive(pid) for pid in children.values())
    registry = re.search(r"registry is ready at (http://127\.0\.0\.1:\d+)", up.text)
    assert registry is not None
    text = up.text
    assert f"gateway      http://127.0.0.1:{gateway_port}\n" in text
    assert f"API docs     http://127.0.0.1:{gateway_port}/docs\n" in text
    assert f"registry     {registry.group(1)}/eureka/web\n" in text
    assert "admin login  boss@shop.test / boss-password\n" in text
    assert f"data         {(tmp_path / '.data').resolve()}\n" in text
    assert re.search(r"Shop is up in \d+\.\d s \(embedded profile\)", text)
    assert "registry     | registry listening on http://127.0.0.1:" in text

    up.process.send_signal(stop_signal)
    assert await up.finish() == 0
    assert await eventually_gone(list(children.values()), within_s=0.5) == []
    assert f"{stop_signal.name} received: stopping" in up.text
    assert "every service stopped" in up.text
    assert (tmp_path / ".data" / "auth.starts").exists()


async def test_shop_up_with_no_restarts_exits_non_zero_when_a_service_crashes(
    stand_in: Path, tmp_path: Path
) -> None:
    up = await shop_up(
        tmp_path,
        "--services-file",
        str(services_file(tmp_path, table(stand_in, auth="crash-on-request"))),
        "--registry-port",
        "0",
        "--gateway-port",
        "0",
        "--max-restarts",
        "0",
    )
    await up.read_until("Press Ctrl-C to stop.")
    children = up.children
    (tmp_path / ".data" / "auth.crash").touch()
    assert await up.finish() == 1
    assert "!! auth exited unexpectedly (exit code 4): stopping every service" in up.text
    assert "!!   auth lost its database" in up.text
    assert await eventually_gone(list(children.values()), within_s=0.5) == []


async def test_shop_up_exits_non_zero_when_a_service_fails_to_start(
    stand_in: Path, tmp_path: Path
) -> None:
    up = await shop_up(
        tmp_path,
        "--services-file",
        str(services_file(tmp_path, table(stand_in, gateway="crash-at-start"))),
        "--registry-port",
        "0",
        "--gateway-port",
        "0",
        "--data-dir",
        str(tmp_path / "elsewhere"),
    )
    assert await up.finish() == 1
    assert "!! gateway exited before it announced its port (exit code 3)" in up.text
    assert "Shop is up" not in up.text
    assert await eventually_gone(list(up.children.values()), within_s=0.5) == []
    assert (tmp_path / "elsewhere" / "gateway.starts").exists()


async def test_a_second_signal_kills_what_is_still_stopping(stand_in: Path, tmp_path: Path) -> None:
    up = await shop_up(
        tmp_path,
        "--services-file",
        str(services_file(tmp_path, table(stand_in, auth="stubborn"))),
        "--registry-port",
        "0",
        "--gateway-port",
        "0",
        "--stop-timeout",
        "60",
    )
    await up.read_until("Press Ctrl-C to stop.")
    up.process.send_signal(signal.SIGTERM)
    await up.read_until("stopping auth")
    began = time.monotonic()
    up.process.send_signal(signal.SIGINT)
    assert await up.finish() == 0
    assert time.monotonic() - began < 10
    assert "auth stopped (killed by SIGKILL)" in up.text
    assert await eventually_gone(list(up.children.values()), within_s=0.5) == []


async def test_a_signal_during_start_up_stops_what_was_started(
    stand_in: Path, tmp_path: Path
) -> None:
    up = await shop_up(
        tmp_path,
        "--services-file",
        str(services_file(tmp_path, table(stand_in, auth="silent"))),
        "--registry-port",
        "0",
        "--gateway-port",
        "0",
        "--ready-timeout",
        "60",
    )
    await up.read_until("auth registry url:")
    children = up.children
    assert set(children) == {"registry", "gateway", "auth"}
    began = time.monotonic()
    up.process.send_signal(signal.SIGHUP)
    assert await up.finish() == 0
    assert time.monotonic() - began < 10
    assert "Shop is up" not in up.text
    assert "SIGHUP received: stopping" in up.text
    assert await eventually_gone(list(children.values()), within_s=0.5) == []


async def test_children_die_with_a_launcher_killed_hard(stand_in: Path, tmp_path: Path) -> None:
    up = await shop_up(
        tmp_path,
        "--services-file",
        str(services_file(tmp_path, table(stand_in))),
        "--registry-port",
        "0",
        "--gateway-port",
        "0",
    )
    await up.read_until("Press Ctrl-C to stop.")
    children = up.children
    up.process.kill()
    await up.finish()
    assert await eventually_gone(list(children.values())) == []


async def test_shop_up_refuses_a_bad_services_file(tmp_path: Path) -> None:
    bad = tmp_path / "services.json"
    bad.write_text(json.dumps([{"name": "auth"}]))
    up = await shop_up(tmp_path, "--services-file", str(bad))
    assert await up.finish() == 2
    assert "bad --services-file" in up.text
    assert "needs exactly one of module or command" in up.text


# -- services given as modules: forks of the pre-importing zygote --------------------------


def module_stand_ins(tmp_path: Path, modes: dict[str, tuple[str, ...]]) -> Path:
    """A package per stand-in (``python -m <name>_stand_in``), its argv built in."""
    root = tmp_path / "modules"
    for name, argv in modes.items():
        package = root / f"{name}_stand_in"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text(
            f"import sys\nsys.argv[1:] = {list(argv)!r}\n{STAND_IN}"
        )
    return root


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")
async def test_module_services_are_forks_of_the_zygote_with_their_own_output_and_exit(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = module_stand_ins(
        tmp_path, {"registry": ("registry", "ok", "REGISTRY_PORT"), "auth": ("auth", "ok")}
    )
    monkeypatch.setenv("PYTHONPATH", str(root))
    services = [
        ServiceSpec(
            name="registry", module="registry_stand_in", port_env="REGISTRY_PORT", role="registry"
        ),
        table(stand_in)[1],  # the gateway: a command, exec'd as before
        ServiceSpec(name="auth", module="auth_stand_in"),
    ]
    output = io.StringIO()
    services = with_ports(services, gateway=free_port())
    async with supervisor(services, data_dir=tmp_path / "data", output=output) as shop:
        pids = shop.pids
        zygote = parent_of(pids["registry"])
        assert zygote != os.getpid() and parent_of(pids["auth"]) == zygote
        assert parent_of(pids["gateway"]) == os.getpid()
        assert len(set(pids.values())) == 3
        # Each fork leads its own process group, as an exec'd service does.
        assert all(os.getpgid(pid) == pid for pid in pids.values())
        registry_url = f"{shop.url('registry')}/eureka"
    assert await eventually_gone([*pids.values(), zygote], within_s=2.0) == []
    text = output.getvalue()
    assert f"auth         | auth registry url: {registry_url}" in text
    assert "auth         | auth found the registry ready: 200" in text
    assert "registry     | registry listening on http://127.0.0.1:" in text
    stops = [line for line in text.splitlines() if re.search(r"\| \w+ stopped cleanly", line)]
    assert len(stops) == 3 and stops[-1].split()[2] == "registry"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")
async def test_a_forked_service_that_exits_is_reported_with_its_code_and_last_lines(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = module_stand_ins(tmp_path, {"auth": ("auth", "crash-at-start")})
    monkeypatch.setenv("PYTHONPATH", str(root))
    services = [*table(stand_in)[:2], ServiceSpec(name="auth", module="auth_stand_in")]
    output = io.StringIO()
    with pytest.raises(ServiceFailed) as failed:
        async with supervisor(
            with_ports(services, gateway=free_port()), data_dir=tmp_path, output=output
        ):
            pass
    assert failed.value.name == "auth"
    assert failed.value.exit_code == 3
    assert "boom: auth cannot open its database" in failed.value.last_lines
    assert "!! auth exited before it announced its port (exit code 3)" in output.getvalue()
