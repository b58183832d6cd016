"""Helpers shared by the test suites (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest

__all__ = ["ManualClock", "free_port", "require_or_skip", "run_module", "stop", "REQUIRE_ALL"]

# CI sets SHOP_REQUIRE_ALL=1: a missing server is then a failure, never a skip.
REQUIRE_ALL = os.environ.get("SHOP_REQUIRE_ALL") == "1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def require_or_skip(reason: str) -> None:
    """Skip locally when a server is missing; fail loudly under SHOP_REQUIRE_ALL=1."""
    if REQUIRE_ALL:
        pytest.fail(f"required test server missing: {reason}", pytrace=False)
    pytest.skip(reason)


class ManualClock:
    """A clock a test moves by hand (epoch seconds), instead of sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def run_module(module: str, *args: str, timeout_s: float = 60.0) -> tuple[int, str]:
    """``python -m module args…`` as an operator runs it: its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    return await process.wait(), output.decode()


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not gone within 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
