"""The registry dashboard: one server-rendered page, every value escaped, no script."""

from __future__ import annotations

from collections import Counter
from html import escape
from itertools import groupby

from shop.registry.domain import Lease

__all__ = ["render_dashboard", "describe_age"]

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2933;
background:#f5f7fa}
header{background:#243b53;color:#fff;padding:16px 32px}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#bcccdc}
main{padding:24px 32px;max-width:1200px}
section{background:#fff;border:1px solid #d9e2ec;border-radius:6px;margin-bottom:20px}
h2{font-size:16px;margin:0;padding:12px 16px;border-bottom:1px solid #d9e2ec}
h2 small{color:#627d98;font-weight:normal}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:8px 16px;border-bottom:1px solid #f0f4f8}
th{color:#627d98;font-weight:600;font-size:12px;text-transform:uppercase}
code{font-size:13px}
.status{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.UP{background:#e3f9e5;color:#207227}
.DOWN{background:#ffe3e3;color:#a61b1b}
.OUT_OF_SERVICE,.DEGRADED{background:#fff3c4;color:#8d6a00}
.STARTING,.UNKNOWN{background:#e4e7eb;color:#3e4c59}
.empty{padding:24px 16px;color:#627d98}
"""


def describe_age(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``: short enough for a table cell."""
    total = max(0, int(seconds))
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def _row(lease: Lease, now: float) -> str:
    status = escape(lease.status)
    if lease.override:
        status_cell = f'<span class="status {status}">{status}</span> <small>(override)</small>'
    else:
        status_cell = f'<span class="status {status}">{status}</span>'
    if (said := lease.health) is not None:
        # The instance's own word (GET /health): still listed, but a dependency fails.
        health, reason = escape(said[0]), escape(said[1])
        status_cell += f' <span class="status {health}" title="{reason}">{health}</span>'
        if reason:
            status_cell += f"<br><small>{reason}</small>"
    return (
        "<tr>"
        f"<td><code>{escape(lease.instance_id)}</code></td>"
        f"<td><code>{escape(lease.host)}:{lease.port}</code></td>"
        f"<td>{status_cell}</td>"
        f"<td>{describe_age(now - lease.renewed_at)} ago</td>"
        f"<td>in {describe_age(lease.expires_at - now)}</td>"
        f"<td>{describe_age(now - lease.registered_at)}</td>"
        "</tr>"
    )


def _application(name: str, leases: list[Lease], now: float) -> str:
    up = sum(1 for lease in leases if lease.status == "UP")
    rows = "".join(_row(lease, now) for lease in leases)
    return (
        f"<section><h2>{escape(name)} <small>{up} of {len(leases)} up</small></h2>"
        "<table><thead><tr><th>Instance</th><th>Address</th><th>Status</th>"
        "<th>Last heartbeat</th><th>Lease expires</th><th>Registered for</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _count(n: int) -> str:
    return f"{n} instance" if n == 1 else f"{n} instances"


def render_dashboard(
    leases: list[Lease], *, now: float, started_at: float, eviction_interval_s: float
) -> str:
    """``leases`` sorted by application, as ``Registry.leases`` gives them."""
    counts = Counter(lease.status for lease in leases)
    summary = ", ".join(f"{n} {escape(s)}" for s, n in sorted(counts.items())) or "none"
    sections = "".join(
        _application(app, list(group), now)
        for app, group in groupby(leases, key=lambda lease: lease.app)
    )
    if not sections:
        sections = '<section><p class="empty">No instance is registered.</p></section>'
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="refresh" content="10">'
        f"<title>Shop registry</title><style>{_STYLE}</style></head><body>"
        "<header><h1>Shop registry</h1>"
        f"<p>Up for {describe_age(now - started_at)} · {_count(len(leases))} ({summary}) · "
        f"expired leases swept every {eviction_interval_s:g} s</p></header>"
        f"<main>{sections}</main></body></html>"
    )
