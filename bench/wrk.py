"""Run wrk (closed loop, C, far cheaper than the Python servers it loads) with bench/wrk.lua.

GETs use wrk's own request; orders (``orders_file``) are POSTs with a token, a body and an
``Idempotency-Key`` of their own each. The result has every status counted, the latency
percentiles and the CPU wrk itself spent (to show the client is not what limits).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WrkResult", "have_wrk", "run_wrk"]

SCRIPT = Path(__file__).resolve().parent / "wrk.lua"


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[int, int] = field(default_factory=dict)
    socket_errors: int = 0  # connect, read, write, timeout
    client_cpu_s: float = 0.0

    def count(self, status: int) -> int:
        return self.statuses.get(status, 0)

    @property
    def not_2xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if not 200 <= s < 300)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv: Sequence[str], env: dict[str, str], timeout_s: float) -> tuple[str, float]:
    before = _children_cpu_s()
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout, _children_cpu_s() - before


async def run_wrk(
    url: str,
    *,
    connections: int,
    duration_s: float,
    threads: int | None = None,
    orders_file: Path | None = None,
    cores: str | None = None,
    headers: Sequence[str] = (),
) -> WrkResult:
    """``wrk -c connections -d duration_s url``, pinned to ``cores`` (taskset) when given."""
    threads = max(1, min(connections, threads or 2))
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout=10s",
        "-s",
        str(SCRIPT),
    ]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    if cores is not None:
        argv = ["taskset", "-c", cores, *argv]
    env = {**os.environ, "BENCH_RUN": uuid.uuid4().hex[:12]}
    env["BENCH_ORDERS"] = str(orders_file) if orders_file else ""
    out, cpu = await asyncio.to_thread(_run, argv, env, duration_s + 30)
    line = next((x for x in out.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out[-1000:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = data["duration_us"] / 1e6
    lat = data["latency_us"]
    errors = data["errors"]
    return WrkResult(
        requests=data["requests"],
        seconds=round(seconds, 3),
        rps=data["requests"] / seconds if seconds else 0.0,
        p50_ms=lat["p50"] / 1e3,
        p90_ms=lat["p90"] / 1e3,
        p99_ms=lat["p99"] / 1e3,
        max_ms=lat["max"] / 1e3,
        statuses={int(k): int(v) for k, v in data["statuses"].items()},
        socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        client_cpu_s=round(cpu, 3),
    )
