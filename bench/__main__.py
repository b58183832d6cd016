"""``python -m bench`` (``make bench``): run every benchmark, print a table, exit 1 on a FAIL."""

from __future__ import annotations

import argparse
import os
import sys

from bench import gateway_proxy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="measured seconds per c=16 phase"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per phase")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.2f} before the run", flush=True)
    report = gateway_proxy.run(duration_s=args.duration, warmup_s=args.warmup)
    print("\n".join(gateway_proxy.format_report(report)))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
