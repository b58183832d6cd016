"""The real system: `shop up` started as a process on free ports, driven through the gateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import free_port

READY_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class System:
    gateway: str
    registry: str
    log: Path
    data_dir: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_until_serving(system: System, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"`shop up` exited with {proc.returncode}:\n{system.output()[-4000:]}")
            if "Press Ctrl-C to stop." not in system.output():
                time.sleep(0.2)  # the launcher says so once every service is ready
                continue
            try:
                jwks = client.get(f"{system.gateway}/auth/.well-known/jwks.json")
                if jwks.status_code == 200 and jwks.json()["keys"]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    pytest.fail(f"the system was not serving within {READY_TIMEOUT_S}s:\n{system.output()[-4000:]}")


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    root = tmp_path_factory.mktemp("system")
    registry_port, gateway_port = free_port(), free_port()
    system = System(
        gateway=f"http://127.0.0.1:{gateway_port}",
        registry=f"http://127.0.0.1:{registry_port}",
        log=root / "shop-up.log",
        data_dir=root / "data",
    )
    env = {
        **os.environ,
        "SHOP_HEARTBEAT_INTERVAL_S": "1",
        "SHOP_REGISTRY_CACHE_TTL_S": "1",
        "REGISTRY_EVICTION_INTERVAL_S": "1",
        # A hung inventory must open the order service's breaker within a test's patience.
        "ORDER_INVENTORY_TIMEOUT_S": "0.5",
        "ORDER_BREAKER_FAILURE_THRESHOLD": "3",
        "ORDER_BREAKER_OPEN_S": "2",
        "ORDER_RELEASE_BACKOFF_MAX_S": "2",
    }
    command = [
        sys.executable,
        "-m",
        "shop.launcher.cli",
        "up",
        "--registry-port",
        str(registry_port),
        "--gateway-port",
        str(gateway_port),
        "--data-dir",
        str(system.data_dir),
    ]
    with system.log.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_serving(system, proc)
        yield system
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("`shop up` did not stop within 30 s of Ctrl-C")


@pytest.fixture
def gateway(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.gateway, timeout=10.0) as client:
        yield client
