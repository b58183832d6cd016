"""The supervising launcher: a service that crashes after start-up is started again (backoff,
a limit, one clear line), the others keep running, and stopping still stops everything.

Stand-in services as in test_launcher.py; the output is waited on line by line (no sleeps).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from shop.launcher import ServiceSpec, shop_system
from shop.launcher.services import with_ports
from shop.launcher.supervisor import RestartPolicy
from tests.integration.test_launcher import (
    alive,
    eventually_gone,
    get_status,
    module_stand_ins,
    parent_of,
    services_file,
    shop_up,
    stand_in,
    supervisor,
    table,
)
from tests.support import free_port

__all__ = ["stand_in"]  # the fixture, used by name

QUICK = RestartPolicy(first_delay_s=0.01, max_delay_s=0.01)


class Transcript(io.StringIO):
    """The launcher's output, which a test can wait on instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self._written = asyncio.Event()

    def write(self, text: str) -> int:
        count = super().write(text)
        self._written.set()
        return count

    async def until(self, pattern: str, *, count: int = 1, within_s: float = 15.0) -> None:
        async with asyncio.timeout(within_s):
            while len(re.findall(pattern, self.getvalue())) < count:
                self._written.clear()
                await self._written.wait()


def with_inventory(stand_in: Path, mode: str = "ok") -> list[ServiceSpec]:
    """The stand-in table plus a service told its port (``INVENTORY_PORT``), as in SERVICES."""
    command = (sys.executable, str(stand_in), "inventory", mode, "INVENTORY_PORT")
    inventory = ServiceSpec(name="inventory", command=command, port_env="INVENTORY_PORT")
    return with_ports([*table(stand_in), inventory], gateway=free_port())


def starts(data_dir: Path, name: str) -> int:
    return len((data_dir / f"{name}.starts").read_text().splitlines())


def crash(data_dir: Path, name: str, code: int = 4) -> None:
    """Make a ``crash-on-request`` stand-in (and each restart of it) exit with ``code``."""
    told = data_dir / f"{name}.crash.tmp"
    told.write_text(str(code))
    told.rename(data_dir / f"{name}.crash")  # whole, or not at all


async def test_a_killed_service_is_restarted_on_its_port_while_the_others_keep_running(
    stand_in: Path, tmp_path: Path
) -> None:
    output = Transcript()
    async with supervisor(
        with_inventory(stand_in), data_dir=tmp_path, output=output, restart=QUICK
    ) as shop:
        keeping = asyncio.create_task(shop.wait())
        before, url = shop.pids, shop.url("inventory")
        os.kill(before["inventory"], signal.SIGKILL)
        await output.until(r"inventory is ready at", count=2)
        after = shop.pids
        assert after["inventory"] != before["inventory"] and alive(after["inventory"])
        assert {n: p for n, p in after.items() if n != "inventory"} == {
            n: p for n, p in before.items() if n != "inventory"
        }
        assert shop.url("inventory") == url, "the same port: callers and the registry stay right"
        assert await asyncio.to_thread(get_status, f"{url}/health/ready") == 200
        assert not keeping.done()
    assert await asyncio.wait_for(keeping, 5) is None
    assert await eventually_gone(list(after.values()), within_s=1) == []
    notes = re.findall(r"launcher +\| inventory crashed.*", output.getvalue())
    assert notes == [
        "launcher     | inventory crashed (killed by SIGKILL): restarting it in 0.01 s"
        " (restart 1 of at most 5 within 60 s)"
    ]
    assert starts(tmp_path, "inventory") == 2


async def test_what_a_crashed_service_started_goes_before_it_is_restarted(
    stand_in: Path, tmp_path: Path
) -> None:
    output = Transcript()
    services = with_ports(table(stand_in, auth="grandchild"), gateway=free_port())
    async with supervisor(services, data_dir=tmp_path, output=output, restart=QUICK) as shop:
        keeping = asyncio.create_task(shop.wait())
        first = re.search(r"auth grandchild pid (\d+)", output.getvalue())
        assert first is not None and alive(int(first[1]))
        os.kill(shop.pids["auth"], signal.SIGKILL)
        await output.until(r"auth is ready at", count=2)
        assert await eventually_gone([int(first[1])], within_s=1) == []
        await shop.stop()
        assert await keeping is None


async def test_a_service_that_keeps_crashing_stops_the_shop_at_the_limit(
    stand_in: Path, tmp_path: Path
) -> None:
    output = Transcript()
    policy = RestartPolicy(limit=2, first_delay_s=0.01, max_delay_s=0.01)
    shop = supervisor(
        with_inventory(stand_in, "crash-on-request"),
        data_dir=tmp_path,
        output=output,
        restart=policy,
    )
    async with shop:
        pids = list(shop.pids.values())
        crash(tmp_path, "inventory")
        failure = await asyncio.wait_for(shop.wait(), 15)
        assert failure is not None and failure.name == "inventory"
        assert failure.reason == "crashed 3 times within 60 s (exit code 4)"
    text = output.getvalue()
    assert "!! inventory crashed 3 times within 60 s (exit code 4): stopping every service" in text
    assert "restart 2 of at most 2 within 60 s" in text
    assert starts(tmp_path, "inventory") == 3
    assert await eventually_gone([*pids, *shop.pids.values()], within_s=1) == []


async def test_a_service_refusing_its_settings_is_not_restarted(
    stand_in: Path, tmp_path: Path
) -> None:
    output = Transcript()
    shop = supervisor(
        with_inventory(stand_in, "crash-on-request"),
        data_dir=tmp_path,
        output=output,
        restart=QUICK,
    )
    async with shop:
        crash(tmp_path, "inventory", code=2)
        failure = await asyncio.wait_for(shop.wait(), 15)
    assert failure is not None and failure.exit_code == 2
    assert (
        "!! inventory refused its settings and is not restarted (exit code 2):"
        " stopping every service" in output.getvalue()
    )
    assert starts(tmp_path, "inventory") == 1


@pytest.mark.parametrize("cancel_wait", [False, True], ids=["stop", "cancel-then-stop"])
async def test_stopping_during_the_backoff_is_prompt_and_restarts_nothing(
    stand_in: Path, tmp_path: Path, cancel_wait: bool
) -> None:
    """``shop_system`` users call stop() while wait() runs; ``shop up`` cancels wait() first."""
    output = Transcript()
    slow = RestartPolicy(first_delay_s=60, max_delay_s=60)
    async with supervisor(
        with_inventory(stand_in), data_dir=tmp_path, output=output, restart=slow
    ) as shop:
        keeping = asyncio.create_task(shop.wait())
        pids = shop.pids
        os.kill(pids["inventory"], signal.SIGKILL)
        await output.until(r"inventory crashed \(killed by SIGKILL\): restarting it in 60 s")
        began = time.monotonic()
        if cancel_wait:
            keeping.cancel()
    assert time.monotonic() - began < 5
    if not cancel_wait:
        assert await asyncio.wait_for(keeping, 1) is None
    assert await eventually_gone(list(pids.values()), within_s=1) == []
    assert starts(tmp_path, "inventory") == 1
    assert shop.pids == pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is Linux only")
async def test_a_forked_service_is_forked_again_and_a_dead_fork_server_stops_the_shop(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = module_stand_ins(tmp_path, {"inventory": ("inventory", "ok", "INVENTORY_PORT")})
    monkeypatch.setenv("PYTHONPATH", str(root))
    inventory = ServiceSpec(
        name="inventory", module="inventory_stand_in", port_env="INVENTORY_PORT"
    )
    output = Transcript()
    data_dir = tmp_path / "data"
    async with supervisor(
        with_ports([*table(stand_in), inventory], gateway=free_port()),
        data_dir=data_dir,
        output=output,
        restart=QUICK,
    ) as shop:
        keeping = asyncio.create_task(shop.wait())
        first = shop.pids["inventory"]
        zygote = parent_of(first)
        os.kill(first, signal.SIGKILL)
        await output.until(r"inventory is ready at", count=2)
        again = shop.pids["inventory"]
        assert again != first and parent_of(again) == zygote

        os.kill(zygote, signal.SIGKILL)
        failure = await asyncio.wait_for(keeping, 10)
        assert failure is not None and failure.name == "inventory"
        assert f"exited with the fork server (pid {zygote}, killed by SIGKILL)" in failure.reason
    assert await eventually_gone([again, *shop.pids.values()], within_s=2) == []
    assert "!! inventory exited with the fork server" in output.getvalue()


async def test_shop_up_restarts_a_killed_service_and_stops_everything_on_a_signal(
    stand_in: Path, tmp_path: Path
) -> None:
    up = await shop_up(
        tmp_path,
        "--services-file",
        str(services_file(tmp_path, with_inventory(stand_in))),
        "--registry-port",
        "0",
    )
    await up.read_until("Press Ctrl-C to stop.")
    before = up.children
    os.kill(before["inventory"], signal.SIGKILL)
    await up.read_until("inventory crashed (killed by SIGKILL): restarting it in 0.5 s")
    await up.read_until("inventory is ready at")
    after = up.children
    assert after["inventory"] != before["inventory"]
    assert all(alive(pid) for pid in after.values())
    assert {n: p for n, p in after.items() if n != "inventory"} == {
        n: p for n, p in before.items() if n != "inventory"
    }
    up.process.send_signal(signal.SIGINT)
    assert await up.finish() == 0
    assert "every service stopped" in up.text
    assert await eventually_gone([*before.values(), *after.values()], within_s=0.5) == []


async def test_the_real_shop_takes_orders_again_after_inventory_is_killed(tmp_path: Path) -> None:
    """The whole Shop (forked services, real registry): kill -9 inventory, then order through
    the gateway. The restart keeps inventory's port, so the registry's entry and the order
    service's cached address stay right (the instance id is host:app:port)."""
    output = Transcript()
    async with shop_system(data_dir=tmp_path, output=output, restart=QUICK) as shop:
        keeping = asyncio.create_task(shop.wait())
        async with httpx.AsyncClient(base_url=shop.url("gateway"), timeout=10) as gateway:
            user = {"name": "Ada", "email": "ada@example.com", "password": "analytical-engine"}
            assert (await gateway.post("/auth/register", json=user)).status_code == 201
            login = await gateway.post("/auth/token", json=user)
            bearer = {"Authorization": f"Bearer {login.json()['access_token']}"}
            order = {"orderLineItemDtoList": [{"skuCode": "iphone_15", "quantity": 1}]}
            placed = await gateway.post("/api/order", headers=bearer, json=order)
            assert placed.status_code == 201, placed.text

            inventory, url = shop.pids["inventory"], shop.url("inventory")
            others = {n: p for n, p in shop.pids.items() if n != "inventory"}
            os.kill(inventory, signal.SIGKILL)
            await output.until(r"inventory is ready at", count=2, within_s=20)
            assert shop.url("inventory") == url
            assert {n: p for n, p in shop.pids.items() if n != "inventory"} == others
            placed = await gateway.post("/api/order", headers=bearer, json=order)
            assert placed.status_code == 201, placed.text
        assert not keeping.done()
    assert await asyncio.wait_for(keeping, 5) is None
