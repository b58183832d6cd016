"""``python -m bench`` (``make bench``): the whole system against the targets of issue 8.

Runs, in one go: the whole Shop under orders (bench/system.py), the gateway against nginx
(bench/proxy_ratio.py) and the gateway's proxy path (bench/gateway_proxy.py). Prints one
table with PASS/FAIL per target, writes every number to bench/results/<timestamp>.json,
and exits 1 if any target fails. ``--mariadb`` runs the system a second time with the
auth, inventory, order and notification stores on MariaDB (127.0.0.1:3306, root).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import gateway_proxy
from bench.proxy_ratio import RatioReport, have_nginx, run_ratio
from bench.system import SystemOptions, SystemReport, run_system
from bench.wrk import have_wrk

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    measured: str
    target: str
    passed: bool


def _broke(part: str, exc: Exception) -> Verdict:
    print(f"!! {part} broke: {exc!r}", file=sys.stderr, flush=True)
    traceback.print_exception(exc, file=sys.stderr)
    return Verdict(
        f"{part}: ran to the end", f"broke: {str(exc).splitlines()[0][:200]}", "ran", False
    )


def _fmt(value: float, unit: str = "", digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}{unit}".replace(",", " ")


def _system_verdicts(report: SystemReport) -> Iterator[Verdict]:
    tag = f"[{report.store}]"
    orders = report.orders
    if orders is not None:
        bad = orders.not_2xx + orders.socket_errors + (orders.requests - orders.count(201))
        yield Verdict(
            f"{tag} orders/s end to end, c=64",
            f"{orders.rps:.0f}/s",
            ">= 600/s",
            orders.rps >= 600,
        )
        yield Verdict(
            f"{tag} every order 201 (c=64 run)",
            f"{max(0, bad)} not 201 of {orders.requests}",
            "0",
            bad == 0 and orders.requests > 0,
        )
        cpu = report.orders_cpu_ms.get("all", math.nan)
        yield Verdict(
            f"{tag} CPU per order, all processes", _fmt(cpu, " ms", 2), "<= 2.5 ms", cpu <= 2.5
        )
    yield Verdict(
        f"{tag} notifications = orders",
        f"{report.notifications} / {report.orders_in_db} (wrk read {report.orders_created} 201s)",
        "equal",
        report.notifications == report.orders_in_db > 0,
    )
    if report.hot is not None:
        hot = report.hot
        no_503 = hot.count(503) == 0 and report.last_units.get("other", 1) == 0
        yield Verdict(
            f"{tag} one hot SKU, 200 buyers",
            f"{hot.rps:.0f}/s",
            ">= 500/s",
            hot.rps >= 500,
        )
        yield Verdict(
            f"{tag} hot SKU: breaker closed (no 503)",
            f"{hot.count(503)} x 503, {hot.not_2xx - hot.count(503)} other non-2xx; last units:"
            f" {report.last_units.get('other')} neither 201 nor 409",
            "0 x 503",
            no_503,
        )
    last = report.last_units
    oversold = (
        report.min_stock < 0
        or report.reserved_units != report.orders_in_db
        or bool(report.unbalanced_skus)
        or last.get("created") != last.get("units")
        or last.get("stock_after") != 0
    )
    yield Verdict(
        f"{tag} 0 oversell",
        f"min stock {report.min_stock}, reserved {report.reserved_units} units for "
        f"{report.orders_in_db} orders, {len(report.unbalanced_skus)} SKUs unbalanced, last "
        f"{last.get('units')} units: {last.get('created')} orders, stock {last.get('stock_after')}",
        "stock >= 0, reserved = ordered",
        not oversold,
    )
    lat = report.latency
    if lat is not None:
        ok = lat.p99_ms <= 100 and lat.achieved_rate >= 0.95 * lat.rate and not lat.other
        yield Verdict(
            f"{tag} order 201 -> notification p99 at {lat.rate:.0f}/s",
            f"{_fmt(lat.p99_ms, ' ms', 1)} (p50 {_fmt(lat.p50_ms, ' ms', 1)}, "
            f"{lat.achieved_rate:.0f}/s got 201, {sum(lat.other.values())} not)",
            "<= 100 ms",
            ok,
        )
    brk = report.breaker
    if brk is not None:
        share = brk.share_503_retry_after
        yield Verdict(
            f"{tag} breaker open: POST /api/order p99 at {brk.rate:.0f}/s",
            f"{_fmt(brk.p99_ms, ' ms', 2)} (p50 {_fmt(brk.p50_ms, ' ms', 2)}, max "
            f"{_fmt(brk.max_ms, ' ms', 1)}), {100 * share:.1f}% 503 with Retry-After",
            "<= 5 ms, 100% 503 + Retry-After",
            brk.p99_ms <= 5 and share == 1.0,
        )
        yield Verdict(
            f"{tag} breaker: orders placed again after SIGCONT",
            f"{_fmt(brk.recovered_after_s, ' s', 1)} (opened {_fmt(brk.opened_after_s, ' s', 1)}"
            " after SIGSTOP)",
            "<= 12 s (the breaker's 10 s window)",
            brk.recovered_after_s <= 12,
        )
    yield Verdict(
        f"{tag} shop up -> all ready",
        _fmt(report.startup_s, " s", 1),
        "<= 4 s",
        report.startup_s <= 4,
    )
    yield Verdict(
        f"{tag} idle memory, all processes (PSS, after the run)",
        f"{_fmt(report.settled_pss_mib, ' MiB')} (RSS {_fmt(report.settled_rss_mib, ' MiB')}, "
        f"before load {_fmt(report.idle_pss_mib, ' MiB')})",
        "<= 450 MiB",
        report.settled_pss_mib <= 450,
    )


def _ratio_verdicts(ratio: RatioReport) -> Iterator[Verdict]:
    gw, ng = ratio.gateway_c16, ratio.nginx_c16
    yield Verdict(
        "gateway req/s / nginx req/s, c=16, one core each",
        f"{ratio.ratio:.3f} ({gw.rps if gw else 0:.0f} / {ng.rps if ng else 0:.0f})",
        ">= 0.35",
        ratio.ratio >= 0.35,
    )
    traced = ratio.traced_c16
    rounds = " ".join(f"{t:.0f}/{u:.0f}" for u, t in ratio.together)
    yield Verdict(
        "gateway req/s with tracing at a 10 % sample / without",
        f"{ratio.traced_share:.3f} (loaded at once: {rounds}; in turn"
        f" {ratio.traced_share_in_turn:.3f})",
        ">= 0.90",
        ratio.traced_share >= 0.90,
    )
    hop = ratio.hop_us(ratio.gateway_c1)
    cross = ratio.hop_us(ratio.gateway_c1_cross)
    yield Verdict(
        "latency one gateway hop adds, p50, c=1",
        f"+{_fmt(hop, ' us')} (nginx +{_fmt(ratio.hop_us(ratio.nginx_c1), ' us')}; across"
        f" cores +{_fmt(cross, ' us')}, nginx +{_fmt(ratio.hop_us(ratio.nginx_c1_cross), ' us')})",
        "<= 80 us",
        hop <= 80,
    )
    errors = sum(
        (r.not_2xx + r.socket_errors)
        for r in (
            ratio.direct_c16,
            gw,
            ng,
            traced,
            ratio.direct_c1,
            ratio.gateway_c1,
            ratio.nginx_c1,
            ratio.gateway_c1_cross,
            ratio.nginx_c1_cross,
        )
        if r is not None
    )
    yield Verdict("proxy runs: errors and non-2xx", str(errors), "0", errors == 0)


def _system_lines(report: SystemReport) -> Iterator[str]:
    yield f"--- the whole system, {report.store} stores ---"
    yield f"shop up -> all ready: {report.startup_s:.1f} s"
    for name, result in (("orders c=64", report.orders), ("hot SKU c=200", report.hot)):
        if result is None:
            continue
        yield (
            f"{name:<14} {result.rps:7.0f}/s  p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f}"
            f" ms  statuses {dict(sorted(result.statuses.items()))}  socket errors "
            f"{result.socket_errors}  wrk CPU {result.client_cpu_s:.2f} s"
        )
    if report.orders_cpu_ms:
        parts = ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(report.orders_cpu_ms.items(), key=lambda kv: -kv[1])
        )
        drain = report.orders_drain_s
        yield f"CPU ms per order: {parts} (notifications caught up {drain:.1f} s after the run)"
        if not math.isnan(report.database_cpu_ms):
            yield f"  and the MariaDB server, not counted above: {report.database_cpu_ms:.2f} ms"
    yield f"last units: {report.last_units}"
    for lat in (report.latency_probe, report.latency):
        if lat is None:
            continue
        yield (
            f"201 -> notification at {lat.rate:.0f}/s: sent {lat.sent}, 201 {lat.created} "
            f"({lat.achieved_rate:.0f}/s), others {lat.other}, p50 {_fmt(lat.p50_ms, ' ms', 1)} "
            f"p99 {_fmt(lat.p99_ms, ' ms', 1)} max {_fmt(lat.max_ms, ' ms', 1)}"
        )
    brk = report.breaker
    if brk is not None:
        yield (
            f"breaker open, {brk.rate:.0f}/s for {brk.seconds:g} s: statuses {brk.statuses}, "
            f"{brk.with_retry_after} with Retry-After, p50 {_fmt(brk.p50_ms, ' ms', 2)} p99 "
            f"{_fmt(brk.p99_ms, ' ms', 2)} max {_fmt(brk.max_ms, ' ms', 1)}; opened "
            f"{_fmt(brk.opened_after_s, ' s', 1)} after SIGSTOP, orders again "
            f"{_fmt(brk.recovered_after_s, ' s', 1)} after SIGCONT"
        )
    yield f"PSS MiB by process after the run: {report.pss_by_process_mib}"
    if report.idle_cpu_percent:
        idle = report.idle_cpu_percent
        yield (
            f"idle CPU after start-up, % of one core: all {sum(idle.values()):.1f}, "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(idle.items(), key=lambda kv: -kv[1]))
        )
    for name, frames in report.pyspy.items():
        yield f"py-spy {name}: " + " | ".join(frames)
    for note in report.notes:
        yield f"note: {note}"


def _ratio_lines(ratio: RatioReport) -> Iterator[str]:
    yield "--- gateway vs nginx, same backend (proxies on core 0, wrk and backend on core 1) ---"
    yield "--- (c=1x: the proxies on core 0; c=1: moved to core 1 with wrk and the backend) ---"
    for name in ("direct", "nginx", "gateway", "traced"):
        for conc, suffix in ((16, "c16"), ("1x", "c1_cross"), (1, "c1")):
            r = getattr(ratio, f"{name}_{suffix}", None)
            if r is not None:
                yield (
                    f"{name:<8} c={conc:<3} {r.rps:8.0f} req/s  p50 {r.p50_ms * 1e3:7.0f} us  "
                    f"p99 {r.p99_ms * 1e3:7.0f} us  wrk CPU {r.client_cpu_s:.2f} s"
                )


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--mariadb", action="store_true", help="also run on MariaDB stores")
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured order run")
    parser.add_argument("--ratio-seconds", type=float, default=3.0, help="each proxy run")
    parser.add_argument(
        "--proxy-duration", type=float, default=2.0, help="gateway_proxy c=16 phases (0: skip)"
    )
    parser.add_argument(
        "--py-spy", type=Path, default=None, metavar="DIR", help="profile every service into DIR"
    )
    args = parser.parse_args(argv)
    if not have_wrk() or not have_nginx():
        print("make bench needs wrk and nginx: apt-get install -y wrk nginx-light", file=sys.stderr)
        return 2
    began = time.monotonic()
    load_before = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before the run", flush=True)
    verdicts: list[Verdict] = []
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
        },
    }
    stores = ["sqlite", "mariadb"] if args.mariadb else ["sqlite"]
    for store in stores:
        options = SystemOptions(
            mariadb=store == "mariadb",
            order_seconds=args.seconds,
            pyspy_dir=(args.py_spy / store) if args.py_spy and store == "sqlite" else None,
        )
        try:
            with tempfile.TemporaryDirectory(prefix="shop-bench-") as tmp:
                system = run_system(options, Path(tmp))
        except Exception as exc:  # one broken part must not lose the others' numbers
            verdicts.append(_broke(f"[{store}] the whole system", exc))
            continue
        results[f"system_{store}"] = system.as_json()
        verdicts += _system_verdicts(system)
        print("\n".join(_system_lines(system)), flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="shop-bench-") as tmp:
            ratio = run_ratio(Path(tmp), seconds=args.ratio_seconds)
    except Exception as exc:
        verdicts.append(_broke("gateway vs nginx", exc))
    else:
        results["gateway_vs_nginx"] = asdict(ratio) | {"ratio": ratio.ratio}
        verdicts += _ratio_verdicts(ratio)
        print("\n".join(_ratio_lines(ratio)), flush=True)
    if args.proxy_duration > 0:
        try:
            proxy = gateway_proxy.run(duration_s=args.proxy_duration, warmup_s=0.5)
        except Exception as exc:
            verdicts.append(_broke("gateway_proxy", exc))
            proxy = gateway_proxy.Report(checks=[])
        results["gateway_proxy"] = asdict(proxy)
        print("\n".join(gateway_proxy.format_report(proxy)), flush=True)
        verdicts += [
            Verdict(f"gateway_proxy: {c.name}", c.measured, c.target, c.passed)
            for c in proxy.checks
        ]
    load_after = os.getloadavg()
    results["machine"]["loadavg_after"] = load_after
    results["seconds"] = round(time.monotonic() - began, 1)
    results["verdicts"] = [asdict(v) for v in verdicts]
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(_plain(results), indent=2, default=str) + "\n")
    print()
    width = max(len(v.name) for v in verdicts)
    for v in verdicts:
        verdict = "PASS" if v.passed else "FAIL"
        print(f"{verdict}  {v.name:<{width}}  {v.measured}  (target {v.target})")
    print(
        f"\n{sum(v.passed for v in verdicts)}/{len(verdicts)} targets met in "
        f"{results['seconds']:.0f} s; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; results in {out}"
    )
    return 0 if all(v.passed for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
