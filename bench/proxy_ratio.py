"""The gateway against nginx as a reverse proxy, to the same backend.

Processes, all on loopback, all stopped at the end (SIGTERM, then SIGKILL):

- **backend**: nginx answering an 80-byte JSON product on every path (cheap, so that the
  proxies are what is measured), pinned with the load client;
- the real **registry**, with the backend registered as product-service;
- the real **gateway**, pinned to core 0 (``taskset``);
- **nginx** as a reverse proxy (one worker, keep-alive to the backend), pinned to core 0;
- a second gateway, **traced**: spans exported over OTLP/HTTP (to the backend nginx, which
  answers ``/v1/traces`` with an empty 200, as a collector does) at a 10 % sample
  (``parentbased_traceidratio``, 0.1), pinned to core 0 as well; its share is measured with
  both gateways loaded at once (each by its own wrk), so that the host's swings fall on both;
- **wrk**, pinned to core 1.

Measured: req/s through each proxy at c=16 (gateway ÷ nginx is the ratio; traced ÷ gateway is
what tracing at 10 % costs, issue 10's overhead budget), and p50 at c=1 directly, through
nginx and through the gateway (the latency one hop adds). Each in turn, ``rounds`` times;
each keeps its best run.

The c=1 phase runs twice. First as the c=16 one, the proxies on core 0 and the client and
the backend on core 1 (``*_c1_cross``, shown): every request then crosses cores twice each
way and wakes core 0 from idle, which on this VM has come to cost nginx itself 105-195 µs
(docs/benchmarks.md, "The hop at c=1"). Then with the proxies moved to core 1 too
(``*_c1``, the hop judged): what the proxy itself adds, nginx's +18-32 µs there being the
issue's own anchor (+29 µs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.gateway_proxy import PRODUCT, UNLIMITED, _register
from bench.procs import free_port, stop_process
from bench.wrk import WrkResult, run_wrk

__all__ = ["RatioReport", "have_nginx", "run_ratio"]

ROOT = Path(__file__).resolve().parent.parent
PROXY_CORE, CLIENT_CORE = "0", "1"

_BACKEND = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    {body}
}}
"""

_BACKEND_SERVER = """
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{product}'; }}
        location = /v1/traces {{ default_type application/x-protobuf; return 200 ''; }}
    }}
"""

_PROXY_SERVER = """
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; keepalive_requests 10000000; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


@dataclass(slots=True)
class RatioReport:
    direct_c16: WrkResult | None = None
    nginx_c16: WrkResult | None = None
    gateway_c16: WrkResult | None = None
    traced_c16: WrkResult | None = None
    direct_c1: WrkResult | None = None
    nginx_c1: WrkResult | None = None
    gateway_c1: WrkResult | None = None
    nginx_c1_cross: WrkResult | None = None
    gateway_c1_cross: WrkResult | None = None
    # (untraced, traced) req/s of each round with both gateways loaded at once.
    together: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        if not (self.gateway_c16 and self.nginx_c16 and self.nginx_c16.rps):
            return float("nan")
        return self.gateway_c16.rps / self.nginx_c16.rps

    @property
    def traced_share(self) -> float:
        """The traced gateway's req/s as a share of the untraced one's, both loaded at once
        on the same core (all rounds summed)."""
        untraced = sum(pair[0] for pair in self.together)
        if not untraced:
            return float("nan")
        return sum(pair[1] for pair in self.together) / untraced

    @property
    def traced_share_in_turn(self) -> float:
        """The same from the runs in turn (``traced_c16`` ÷ ``gateway_c16``): shown only, as
        the host's speed can change between the two runs."""
        if not (self.traced_c16 and self.gateway_c16 and self.gateway_c16.rps):
            return float("nan")
        return self.traced_c16.rps / self.gateway_c16.rps

    def hop_us(self, via: WrkResult | None) -> float:
        if via is None or self.direct_c1 is None:
            return float("nan")
        return (via.p50_ms - self.direct_c1.p50_ms) * 1e3


def have_nginx() -> bool:
    return shutil.which("nginx") is not None


def _pinned(core: str, argv: list[str]) -> list[str]:
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", core, *argv]


class _Started:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.popens: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.pids: dict[str, int] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.popens.append((popen, log))
        self.pids[name] = popen.pid  # taskset execs its command: the pid is the process's

    def move(self, name: str, core: str) -> None:
        """Pin ``name``'s process, every thread of it and its children (nginx's worker) to
        ``core``."""
        taskset = shutil.which("taskset") or "taskset"
        pending = [self.pids[name]]
        while pending:
            pid = pending.pop()
            subprocess.run(
                [taskset, "-a", "-p", "-c", core, str(pid)], check=True, stdout=subprocess.DEVNULL
            )
            with contextlib.suppress(OSError):
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                pending += [int(child) for child in children]

    def nginx(self, name: str, body: str, core: str) -> None:
        home = self.workdir / name
        home.mkdir()
        conf = home / "nginx.conf"
        conf.write_text(_BACKEND.format(dir=home, body=body))
        argv = ["nginx", "-p", str(home), "-e", str(home / "error.log"), "-c", str(conf)]
        self.start(name, _pinned(core, argv))

    def stop_all(self) -> None:
        for popen, _ in reversed(self.popens):
            stop_process(popen, group=True, timeout_s=5.0)


async def _wait_ok(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:g} s")


async def _measure(report: RatioReport, started: _Started, *, seconds: float, rounds: int) -> None:
    backend, proxy, registry, gateway = free_port(), free_port(), free_port(), free_port()
    traced = free_port()
    body = _BACKEND_SERVER.format(port=backend, product=json.dumps(PRODUCT))
    started.nginx("backend", body, CLIENT_CORE)
    started.nginx("nginx", _PROXY_SERVER.format(port=proxy, backend=backend), PROXY_CORE)
    common = {"SHOP_DATA_DIR": str(started.workdir / "data"), "SHOP_LOG_LEVEL": "WARNING"}
    started.start(
        "registry",
        [sys.executable, "-m", "shop.registry"],
        {**common, "REGISTRY_PORT": str(registry)},
    )
    registry_url = f"http://127.0.0.1:{registry}/eureka"
    await _wait_ok(f"http://127.0.0.1:{registry}/health/live")
    await _wait_ok(f"http://127.0.0.1:{backend}/api/product")
    async with aiohttp.ClientSession() as http:
        await _register(http, registry_url, backend)
    started.start(
        "gateway",
        _pinned(PROXY_CORE, [sys.executable, "-m", "shop.gateway"]),
        {
            **common,
            **UNLIMITED,
            "GATEWAY_PORT": str(gateway),
            "SHOP_REGISTRY_URL": registry_url,
            "SHOP_JWKS_URL": f"http://127.0.0.1:{backend}/auth/.well-known/jwks.json",
        },
    )
    started.start(
        "traced",
        _pinned(PROXY_CORE, [sys.executable, "-m", "shop.gateway"]),
        {
            **common,
            **UNLIMITED,
            "GATEWAY_PORT": str(traced),
            "SHOP_REGISTRY_URL": registry_url,
            "SHOP_JWKS_URL": f"http://127.0.0.1:{backend}/auth/.well-known/jwks.json",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{backend}",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        },
    )
    await _wait_ok(f"http://127.0.0.1:{gateway}/health/ready")
    await _wait_ok(f"http://127.0.0.1:{traced}/health/ready")
    urls = {
        "direct": f"http://127.0.0.1:{backend}/api/product",
        "nginx": f"http://127.0.0.1:{proxy}/api/product",
        "gateway": f"http://127.0.0.1:{gateway}/api/product",
        "traced": f"http://127.0.0.1:{traced}/api/product",
    }
    for url in urls.values():
        await _wait_ok(url)
    # Other work on the machine preempts the pinned proxies now and then: each proxy is
    # measured in turn, ``rounds`` times, and keeps its best run (highest req/s at c=16,
    # lowest p50 at c=1), so one unlucky second does not decide the ratio.
    for url in urls.values():
        await run_wrk(url, connections=16, duration_s=1, threads=1, cores=CLIENT_CORE)
    for _ in range(rounds):
        for name, url in urls.items():
            result = await run_wrk(
                url, connections=16, duration_s=seconds, threads=1, cores=CLIENT_CORE
            )
            best = getattr(report, f"{name}_c16")
            if best is None or result.rps > best.rps:
                setattr(report, f"{name}_c16", result)
    # Tracing's cost (issue 10's budget): the two gateways loaded at once, each by a wrk of
    # its own, on the same core: they share every moment of the host, whose speed swings by
    # tens of percent within minutes here, so a swing falls on both alike.
    for _ in range(rounds):
        untraced, traced_run = await asyncio.gather(
            *(
                run_wrk(
                    urls[name], connections=16, duration_s=seconds, threads=1, cores=CLIENT_CORE
                )
                for name in ("gateway", "traced")
            )
        )
        report.together.append((untraced.rps, traced_run.rps))
    del urls["traced"]  # its budget is req/s only
    await _c1(report, urls, seconds=seconds, rounds=rounds, suffix="_c1_cross")
    if _pinned(CLIENT_CORE, []):  # pinning works here: the proxies join the client's core
        started.move("nginx", CLIENT_CORE)
        started.move("gateway", CLIENT_CORE)
    del urls["direct"]  # the same in both layouts: measured with the first
    await _c1(report, urls, seconds=seconds, rounds=rounds, suffix="_c1")


async def _c1(
    report: RatioReport, urls: dict[str, str], *, seconds: float, rounds: int, suffix: str
) -> None:
    """p50 at c=1 through each of ``urls``: the best of ``rounds`` runs, as ``{name}{suffix}``
    (``direct`` is always ``direct_c1``)."""
    for _ in range(rounds):
        for name, url in urls.items():
            result = await run_wrk(
                url, connections=1, duration_s=seconds, threads=1, cores=CLIENT_CORE
            )
            attribute = "direct_c1" if name == "direct" else f"{name}{suffix}"
            best = getattr(report, attribute)
            if best is None or result.p50_ms < best.p50_ms:
                setattr(report, attribute, result)


def run_ratio(workdir: Path, *, seconds: float = 3.0, rounds: int = 2) -> RatioReport:
    report = RatioReport()
    started = _Started(workdir)
    try:
        asyncio.run(_measure(report, started, seconds=seconds, rounds=rounds))
    except BaseException:
        for _, log in started.popens:
            with contextlib.suppress(OSError):
                tail = log.read_text(errors="replace")[-1500:]
                sys.stderr.write(f"--- {log.name} ---\n{tail}\n")
        raise
    finally:
        started.stop_all()
    return report
