"""A closed-loop HTTP/1.1 load client, run in its own process so it never shares an event
loop (or a core's worth of GIL) with what it measures.

Each of ``concurrency`` keep-alive connections sends one request, reads the whole answer,
and sends the next. The request bytes are built once; parsing an answer is a header split
and a ``Content-Length`` (or chunked) read, so the client costs little CPU next to the
servers. Bounded by duration and by count, whichever comes first.

``python -m bench.loadgen URL --concurrency 16 --duration 5`` prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

__all__ = ["LoadResult", "percentile", "run_load"]


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    sent: int  # answers read, warm-up included: what the servers did while this ran
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def percentile(sorted_ns: list[int], fraction: float) -> float:
    """Nearest-rank percentile in milliseconds of already sorted nanosecond samples."""
    if not sorted_ns:
        return float("nan")
    rank = min(len(sorted_ns) - 1, max(0, round(fraction * len(sorted_ns)) - 1))
    return sorted_ns[rank] / 1e6


@dataclass(slots=True)
class _Tally:
    measuring_from: int
    until: int
    budget: int
    latencies: list[int]
    errors: int = 0
    sent: int = 0


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one whole answer; its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = -1
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length > 0:
        await reader.readexactly(length)
    return status


async def _connection(host: str, port: int, request: bytes, tally: _Tally) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while tally.budget > 0:
            began = time.perf_counter_ns()
            if began >= tally.until:
                return
            writer.write(request)
            try:
                status = await _read_answer(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                tally.errors += 1
                return
            ended = time.perf_counter_ns()
            tally.sent += 1
            if began >= tally.measuring_from:
                tally.budget -= 1
                tally.latencies.append(ended - began)
                if status >= 400:
                    tally.errors += 1
    finally:
        writer.close()


async def run_load(
    url: str,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    max_requests: int = 1_000_000,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """Load ``url`` (GET) for ``warmup_s`` unmeasured, then ``duration_s`` measured."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", "Accept: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    now = time.perf_counter_ns()
    start = now + int(warmup_s * 1e9)
    tally = _Tally(
        measuring_from=start,
        until=start + int(duration_s * 1e9),
        budget=max_requests,
        latencies=[],
    )
    await asyncio.gather(*(_connection(host, port, request, tally) for _ in range(concurrency)))
    # The measured window ends at the last answer when the count bound stopped the run first.
    seconds = min(duration_s, (time.perf_counter_ns() - start) / 1e9)
    samples = sorted(tally.latencies)
    return LoadResult(
        requests=len(samples),
        sent=tally.sent,
        errors=tally.errors,
        seconds=round(seconds, 3),
        rps=len(samples) / seconds if seconds > 0 else 0.0,
        p50_ms=percentile(samples, 0.50),
        p90_ms=percentile(samples, 0.90),
        p99_ms=percentile(samples, 0.99),
        max_ms=samples[-1] / 1e6 if samples else float("nan"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    args = parser.parse_args(argv)
    headers = dict(h.split(": ", 1) for h in args.header)
    load = run_load(
        args.url,
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_requests=args.max_requests,
        headers=headers,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        result = asyncio.run(load)
    else:
        result = uvloop.run(load)
    sys.stdout.write(json.dumps(asdict(result)) + "\n")


if __name__ == "__main__":
    main()
