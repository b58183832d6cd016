"""A third-party Eureka client (py-eureka-client) against the registry run as its own process.

The client runs in a process of its own too: its heartbeat thread outlives ``stop()``
and only a process exit ends it, and killing that process is how a client "dies".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from tests.support import free_port, stop

JSON = {"Accept": "application/json"}
# Each application's registry credential; the registry process is given them all.
SECRETS = {
    name: f"{name}-secret-{n}-of-at-least-32-characters"
    for n, name in enumerate(["cart-service", "wishlist-service", "auth-service", "order-service"])
}


def with_credential(url: str, app: str) -> str:
    return url.replace("http://", f"http://{app}:{SECRETS[app]}@", 1)


# Writes what it sees as JSON lines to argv[4], then waits for "stop" or "exit" on stdin.
DRIVER = r"""
import asyncio, json, os, sys
import py_eureka_client.eureka_client as eureka_client

server, app_name, port, report = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def say(**fields):
    with open(report, "a") as out:
        out.write(json.dumps(fields) + "\n")

async def main():
    client = await eureka_client.init_async(
        eureka_server=server,
        app_name=app_name,
        instance_ip="127.0.0.1",
        instance_host="127.0.0.1",
        instance_port=port,
        renewal_interval_in_secs=1,
        duration_in_secs=3,
    )
    found = client.applications.get_application(app_name.upper())
    say(started=True, discovered=[(i.instanceId, i.port.port) for i in found.up_instances])
    command = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if command.strip() == "stop":
        # stop() leaves the heartbeat thread running: silence it first, or a heartbeat
        # answered 404 after the cancel makes the library register again.
        async def no_heartbeat(*args, **kwargs):
            return None
        client.send_heartbeat = no_heartbeat
        await asyncio.sleep(0.3)
        await client.stop()
        say(stopped=True)
    os._exit(0)

asyncio.run(main())
"""


@dataclass
class Registry:
    url: str
    log: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=JSON, timeout=5.0)


def wait_for(check: Callable[[], bool], *, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    port = free_port()
    log = tmp_path_factory.mktemp("registry") / "registry.log"
    env = {
        **os.environ,
        "REGISTRY_HOST": "127.0.0.1",
        "REGISTRY_PORT": str(port),
        "REGISTRY_EVICTION_INTERVAL_S": "0.5",
        "REGISTRY_CLIENTS": json.dumps(SECRETS),
        "SHOP_LOG_LEVEL": "INFO",
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "shop.registry"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    running = Registry(url=f"http://127.0.0.1:{port}", log=log)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"registry exited early:\n{log.read_text()}")
        try:
            return httpx.get(f"{running.url}/health/ready", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, within_s=20, what="the registry to be ready")
        assert f"registry listening on http://127.0.0.1:{port}" in log.read_text()
        yield running
    finally:
        stop(process)


@dataclass
class EurekaApp:
    process: subprocess.Popen[str]
    report: Path
    instance_id: str

    def said(self, key: str) -> dict[str, Any] | None:
        if not self.report.exists():
            return None
        for line in self.report.read_text().splitlines():
            fields: dict[str, Any] = json.loads(line)
            if key in fields:
                return fields
        return None


class StartClient(Protocol):
    def __call__(self, app_name: str, *, credential: bool = True) -> EurekaApp:
        """py-eureka-client as ``app_name``, given its credential in the URL unless told not."""


@pytest.fixture
def start_client(registry: Registry, tmp_path: Path) -> Iterator[StartClient]:
    started: list[EurekaApp] = []

    def start(app_name: str, *, credential: bool = True) -> EurekaApp:
        port = free_port()
        server = f"{registry.url}/eureka"
        if credential:
            server = with_credential(server, app_name)
        report = tmp_path / f"{app_name}.jsonl"
        with (tmp_path / f"{app_name}.log").open("w") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    DRIVER,
                    server,
                    app_name,
                    str(port),
                    str(report),
                ],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        client = EurekaApp(process, report, f"127.0.0.1:{app_name}:{port}")
        started.append(client)
        wait_for(lambda: client.said("started") is not None, within_s=20, what="the client")
        return client

    yield start
    for client in started:
        if client.process.poll() is None:
            client.process.kill()
        client.process.wait()
        if client.process.stdin:
            client.process.stdin.close()


def lease_info(registry: Registry, app: str, instance_id: str) -> dict[str, Any]:
    answer = registry.get(f"/eureka/apps/{app}/{instance_id}")
    assert answer.status_code == 200, answer.text
    info: dict[str, Any] = answer.json()["instance"]["leaseInfo"]
    return info


def test_client_registers_discovers_renews_and_cancels(
    registry: Registry, start_client: StartClient
) -> None:
    client = start_client("cart-service")

    listed = registry.get("/eureka/apps/CART-SERVICE")
    assert listed.status_code == 200
    (instance,) = listed.json()["application"]["instance"]
    assert instance["instanceId"] == client.instance_id
    assert instance["status"] == "UP"
    assert instance["leaseInfo"]["durationInSecs"] == 3
    # The client read the registry back (XML) at start-up and found itself.
    port = int(client.instance_id.rsplit(":", 1)[1])
    assert client.said("started") == {"started": True, "discovered": [[client.instance_id, port]]}

    first = lease_info(registry, "CART-SERVICE", client.instance_id)["lastRenewalTimestamp"]
    wait_for(
        lambda: (
            lease_info(registry, "CART-SERVICE", client.instance_id)["lastRenewalTimestamp"] > first
        ),
        within_s=4,
        what="a heartbeat",
    )

    assert client.process.stdin is not None
    client.process.stdin.write("stop\n")
    client.process.stdin.flush()
    wait_for(lambda: client.said("stopped") is not None, within_s=10, what="the client to stop")

    assert registry.get("/eureka/apps/CART-SERVICE").status_code == 404
    assert f"cancelled CART-SERVICE/{client.instance_id}" in registry.log.read_text()


def test_client_that_dies_is_evicted_when_its_lease_runs_out(
    registry: Registry, start_client: StartClient
) -> None:
    client = start_client("wishlist-service")
    assert registry.get(f"/eureka/apps/WISHLIST-SERVICE/{client.instance_id}").status_code == 200

    client.process.kill()
    client.process.wait()
    killed_at = time.monotonic()

    wait_for(
        lambda: registry.get("/eureka/apps/WISHLIST-SERVICE").status_code == 404,
        within_s=6,
        what="the lease to expire",
    )
    assert time.monotonic() - killed_at > 1.0  # gone by expiry, not by a cancel
    wait_for(
        lambda: f"evicted WISHLIST-SERVICE/{client.instance_id}" in registry.log.read_text(),
        within_s=3,
        what="the eviction log line",
    )
    assert f"cancelled WISHLIST-SERVICE/{client.instance_id}" not in registry.log.read_text()


# -- what a client without the credential cannot do, against the real process -----------------


def test_without_its_credential_the_client_cannot_register(
    registry: Registry, start_client: StartClient
) -> None:
    client = start_client("order-service", credential=False)
    # The library keeps running, refused: it never finds itself in the registry.
    assert client.said("started") == {"started": True, "discovered": []}
    assert registry.get("/eureka/apps/ORDER-SERVICE").status_code == 404
    assert "POST /eureka/apps/ORDER-SERVICE from 127.0.0.1 refused" in registry.log.read_text()
    assert not any(secret in registry.log.read_text() for secret in SECRETS.values())


def test_a_rogue_auth_service_cannot_register_cancel_or_override_the_real_one(
    registry: Registry, start_client: StartClient
) -> None:
    real = start_client("auth-service")
    rogue_id = "10.6.6.6:auth-service:8443"
    rogue = {
        "instance": {
            "instanceId": rogue_id,
            "hostName": "10.6.6.6",
            "app": "AUTH-SERVICE",
            "ipAddr": "10.6.6.6",
            "status": "UP",
            "port": {"$": 8443, "@enabled": "true"},
        }
    }
    eureka = f"{registry.url}/eureka/apps/AUTH-SERVICE"
    order = ("order-service", SECRETS["order-service"])
    attempts = {
        "anonymous registration": httpx.post(eureka, json=rogue),
        "order's credential": httpx.post(eureka, json=rogue, auth=order),
        "a guessed secret": httpx.post(eureka, json=rogue, auth=("auth-service", "guess")),
        "anonymous cancel": httpx.delete(f"{eureka}/{real.instance_id}"),
        "anonymous override": httpx.put(
            f"{eureka}/{real.instance_id}/status", params={"value": "OUT_OF_SERVICE"}
        ),
        "override with order's credential": httpx.put(
            f"{eureka}/{real.instance_id}/status",
            params={"value": "OUT_OF_SERVICE"},
            auth=order,
        ),
        "cancel with order's credential": httpx.delete(f"{eureka}/{real.instance_id}", auth=order),
    }

    statuses = {what: answer.status_code for what, answer in attempts.items()}
    assert statuses == {
        "anonymous registration": 401,
        "order's credential": 403,
        "a guessed secret": 401,
        "anonymous cancel": 401,
        "anonymous override": 401,
        "override with order's credential": 403,
        "cancel with order's credential": 403,
    }
    listed = registry.get("/eureka/apps/AUTH-SERVICE").json()["application"]["instance"]
    assert [(i["instanceId"], i["status"]) for i in listed] == [(real.instance_id, "UP")]
