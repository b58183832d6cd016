"""What the bench reads from /proc, and how it stops what it started.

CPU is user + system time from ``/proc/<pid>/stat``; memory is PSS from
``/proc/<pid>/smaps_rollup`` (shared pages split between the processes that share them, so
the sum over processes counts each page once).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "cpu_s",
    "descendants",
    "free_port",
    "pss_kib",
    "rss_kib",
    "stop_process",
    "tree_cpu_s",
    "tree_pss_kib",
]

_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children_table() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            table.setdefault(ppid, []).append(int(entry.name))
    return table


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (children, their children...), not ``pid`` itself."""
    table = _children_table()
    out: list[int] = []
    todo = list(table.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo += table.get(child, [])
    return out


def tree_cpu_s(pid: int) -> float:
    return cpu_s(pid) + sum(cpu_s(p) for p in descendants(pid))


def _rollup_kib(pid: int, field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    return _rollup_kib(pid, "Pss")


def rss_kib(pid: int) -> int:
    return _rollup_kib(pid, "Rss")


def tree_pss_kib(pids: Iterable[int]) -> int:
    return sum(pss_kib(p) for p in pids)


def stop_process(popen: subprocess.Popen[bytes], *, group: bool, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; the whole process group when ``group``."""

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(popen.pid, sig)
            else:
                popen.send_signal(sig)

    if popen.poll() is None:
        send(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while popen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    if popen.poll() is None:
        send(signal.SIGKILL)
        popen.wait(timeout=5)
    elif group:
        # Whatever the process left behind in its group goes too.
        send(signal.SIGKILL)
