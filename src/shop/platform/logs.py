"""Log lines of a service process: cheap on the event loop, written by a thread of its own.

The standard ``QueueHandler``/``QueueListener`` pair wakes the listener thread for every
record (a futex wake and a GIL hand-off per line) and formats each record twice on the
loop; under load that was a fifth of the notification service's CPU. Here the loop only
renders the message (``record.getMessage()``, so arguments changed later cannot change the
line) and appends the record to a buffer. The first record after a quiet spell wakes the
writer, which writes what gathered ``linger_s`` (a few ms) later, formatted, with one
``write``; while lines keep coming it waits twice as long each round, up to
``max_linger_s``, and once a wait finds nothing it sleeps until the next record. So a lone
line appears within a few milliseconds, a steady stream within ``max_linger_s``, in order;
and a slow reader of stdout (a busy launcher, a full pipe) only ever blocks the writer
thread, never the loop.

Why the wait grows: every round of the writer costs the process far more than its
``write``. The thread wakes, and then needs the GIL from a loop that is busy serving, which
hands it over only after the switch interval, with a forced switch each way. Measured on
the loop's side (an event loop serving 500 requests/s, 100 µs of work each, one access line
each, two cores): a round every 5 ms added 27-57 µs of CPU per request over no access line
at all, one every 50 ms 8-20 µs (docs/platform.md, "Performance").

The buffer is bounded (``capacity`` records): when the writer is that far behind, new
records are dropped and counted, and the writer says how many once it catches up. What is
buffered is written at exit (``atexit``) and on SIGTERM before the process dies of it.
The standard library has no batching handler, hence this small one.

Every line made inside a request or an event handler carries its ``request_id``,
``trace_id`` and ``span_id`` (read from ``shop.platform.context`` when the record is made)
and the service's name: readable text, or one JSON object per line (``SHOP_LOG_FORMAT=json``,
for production's log shippers). The access log (:func:`access`, one line per
request) skips ``logging`` altogether: the loop appends a tuple to the same buffer and the
writer formats it, so a request pays about a microsecond for its line.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Literal, TextIO

from shop.platform import context

__all__ = [
    "AccessEntry",
    "BatchingHandler",
    "LineFormatter",
    "LogFormat",
    "access",
    "configure_logging",
    "stop_logging",
]

LOG_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"
LogFormat = Literal["text", "json"]
_OFF = frozenset({"0", "false", "no", "off"})  # SHOP_ACCESS_LOG values pydantic reads as False

# One request's access line, as the loop hands it over: (time.time(), service, method,
# route template, status, seconds, request_id, trace_id, span_id).
AccessEntry = tuple[float, str, str, str, int, float, str, str, str]


class LineFormatter(logging.Formatter):
    """A record or an access entry as one line: ``text`` (``LOG_FORMAT``, then the ids when
    there are any) or ``json`` (one object, the ids as fields). Runs on the writer thread."""

    def __init__(self, fmt: LogFormat = "text", *, service: str | None = None) -> None:
        super().__init__(LOG_FORMAT)
        self.json = fmt == "json"
        self.service = service
        self._stamp = (-1, "")  # (second, its strftime): one tuple, swapped whole

    def format(self, record: logging.LogRecord) -> str:
        ids: tuple[str, str, str] | None = getattr(record, "shop_ids", None)
        if self.json:
            fields: dict[str, object] = {
                "ts": self._timestamp(record.created),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            if self.service:
                fields["service"] = self.service
            if ids is not None:
                fields["request_id"], fields["trace_id"], fields["span_id"] = ids
            if record.exc_info and not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            if record.exc_text:
                fields["exception"] = record.exc_text
            return json.dumps(fields, ensure_ascii=False)
        line = super().format(record)
        if ids is None:
            return line
        head, newline, rest = line.partition("\n")  # ids before a traceback, not after
        return f"{head} {self._ids_text(self.service, *ids)}{newline}{rest}"

    def format_access(self, entry: AccessEntry) -> str:
        created, service, method, route, status, seconds, request_id, trace_id, span_id = entry
        if self.json:
            return json.dumps(
                {
                    "ts": self._timestamp(created),
                    "level": "INFO",
                    "logger": "access",
                    "message": f"{method} {route} {status}",
                    "service": service,
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "request_id": request_id,
                    "trace_id": trace_id,
                    "span_id": span_id,
                },
                ensure_ascii=False,
            )
        return (
            f"{self._timestamp(created)} INFO  access: {method} {route} {status}"
            f" {seconds * 1000:.2f}ms {self._ids_text(service, request_id, trace_id, span_id)}"
        )

    @staticmethod
    def _ids_text(service: str | None, request_id: str, trace_id: str, span_id: str) -> str:
        named = f"service={service} " if service else ""
        return f"{named}request_id={request_id} trace_id={trace_id} span_id={span_id}"

    def _timestamp(self, created: float) -> str:
        """Text: ``asctime`` (local time, milliseconds); JSON: ISO 8601 in UTC. The strftime
        is done once per second."""
        second = int(created)
        cached, stamp = self._stamp
        if second != cached:
            if self.json:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._stamp = (second, stamp)
        millis = int((created - second) * 1000)
        return f"{stamp}.{millis:03d}Z" if self.json else f"{stamp},{millis:03d}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return self._timestamp(record.created)


class BatchingHandler(logging.Handler):
    """Buffers records on the caller's thread; a writer thread formats and writes them in
    batches (see the module docstring)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        linger_s: float = 0.005,
        max_linger_s: float = 0.05,
        capacity: int = 10_000,
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        self._stream = stream
        self._linger_s = linger_s
        self._max_linger_s = max(linger_s, max_linger_s)
        self._capacity = capacity
        # deque.append and popleft are atomic: the loop never takes a lock to log.
        self._records: collections.deque[logging.LogRecord | AccessEntry] = collections.deque()
        self._dropped = 0
        self._waiting = False  # the writer was told about the records in the buffer
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._write_lock = threading.Lock()  # the writer thread and a flush may both write
        self._writer = threading.Thread(target=self._write_batches, name="log-writer", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        """``Handler.handle`` without its lock: the buffer needs none."""
        rv = self.filter(record)
        if rv:
            self.emit(record if isinstance(rv, bool) else rv)
        return bool(rv)

    def emit(self, record: logging.LogRecord) -> None:
        if len(self._records) >= self._capacity:
            self._dropped += 1
            return
        try:
            # Rendered now: the arguments may change (or die) before the writer gets to it.
            record.msg = record.getMessage()
            record.args = None
        except Exception:
            self.handleError(record)
            return
        request_id = context.current_request_id()
        if request_id is not None:  # inside a request or an event handler
            trace = context.current_trace()
            record.shop_ids = (
                request_id,
                trace.trace_id if trace else "-",
                trace.span_id if trace else "-",
            )
        self._records.append(record)
        if not self._waiting:
            self._waiting = True
            self._wake.set()

    def access(self, entry: AccessEntry) -> None:
        """Buffer one access line, formatted by the writer (no ``LogRecord`` on the loop)."""
        if len(self._records) >= self._capacity:
            self._dropped += 1
            return
        self._records.append(entry)
        if not self._waiting:
            self._waiting = True
            self._wake.set()

    def flush(self) -> None:
        """Write what is buffered now, on the caller's thread (SIGTERM, tests); gives up
        after a second if the writer is stuck on a blocked stdout."""
        self._write_out(wait_s=1.0)

    def close(self) -> None:
        """Stop the writer, letting it write what is buffered; if stdout blocks it for more
        than two seconds, the rest is lost rather than the process kept from exiting."""
        self._closing.set()
        self._wake.set()
        if self._writer is not threading.current_thread():
            self._writer.join(timeout=2.0)
        if not self._writer.is_alive():
            self._write_out(wait_s=0)  # what came after the writer's last batch
        super().close()

    def _write_batches(self) -> None:
        """While lines keep coming, one batch per wait with no wake from the loggers, each
        wait twice the last (``linger_s`` up to ``max_linger_s``); once a wait finds
        nothing, sleep until the next record wakes us."""
        while True:
            self._wake.wait()
            self._wake.clear()
            linger = self._linger_s
            while True:
                # Let the batch gather; closing cuts the wait short.
                closing = self._closing.wait(linger)
                linger = min(2 * linger, self._max_linger_s)
                if not self._records and not closing:
                    self._waiting = False  # from here on a record wakes us
                    if not self._records:
                        break
                    self._waiting = True  # one came meanwhile: it is ours already
                self._write_out()
                if closing:
                    return

    def _write_out(self, *, wait_s: float = -1) -> None:
        """Format and write every buffered record in one write; ``wait_s``: how long to
        wait for another thread's write (-1: as long as it takes)."""
        lines: list[str] = []
        records = self._records
        formatter = self.formatter
        line_formatter = formatter if isinstance(formatter, LineFormatter) else None
        while records:
            try:
                item = records.popleft()
            except IndexError:  # another thread (flush at exit) took it
                break
            if isinstance(item, tuple):
                if line_formatter is None:
                    line_formatter = LineFormatter()
                lines.append(line_formatter.format_access(item))
                continue
            try:
                lines.append(self.format(item))
            except Exception:
                self.handleError(item)
        dropped, self._dropped = self._dropped, 0
        if dropped:
            lines.append(f"[{dropped} log lines were dropped: stdout was not being read]")
        if not lines:
            return
        lock = self._write_lock
        if not lock.acquire(timeout=wait_s):
            return
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout is gone (closed pipe): nobody is left to read the lines
        finally:
            lock.release()


_handler: BatchingHandler | None = None
_access_handler: BatchingHandler | None = None  # None: no access lines (off, or not INFO)


def access(
    service: str,
    method: str,
    route: str,
    status: int,
    seconds: float,
    request_id: str,
    trace: context.TraceContext | None,
) -> None:
    """One request's access line: ``route`` is the route's template, never the raw path.
    The ids are passed, not read from the context: the gateway's fast lane has none bound."""
    handler = _access_handler
    if handler is not None:
        handler.access(
            (
                time.time(),
                service,
                method,
                route,
                status,
                seconds,
                request_id,
                trace.trace_id if trace else "-",
                trace.span_id if trace else "-",
            )
        )


def log_format() -> LogFormat:
    """``SHOP_LOG_FORMAT`` (``text`` or ``json``), text when unset: for a process configured
    without its settings (a service process passes ``PlatformSettings.log_format``, JSON by
    default on the production profile: platform/serve.py ``main``)."""
    chosen = os.environ.get("SHOP_LOG_FORMAT", "").strip().lower()
    return "json" if chosen == "json" else "text"


def configure_logging(
    level: str = "INFO",
    *,
    stream: TextIO | None = None,
    linger_s: float = 0.005,
    max_linger_s: float = 0.05,
    fmt: LogFormat | None = None,
    service: str | None = None,
    access_log: bool | None = None,
) -> None:
    """Root logging for a service process: one line per record on stdout (``stream``), in
    ``fmt`` (default: :func:`log_format`), written in batches (gathered for ``linger_s``,
    up to ``max_linger_s`` while lines keep coming) by a thread of its own; flushed at exit
    and on SIGTERM. ``access_log``: a line per request at INFO (default: unless
    ``SHOP_ACCESS_LOG=false``). Called again, it replaces the handler (flushing the old
    one)."""
    global _handler, _access_handler  # noqa: PLW0603 - one handler per process
    if _handler is None:
        atexit.register(stop_logging)
        _flush_on_sigterm()
    else:
        _handler.close()
    # Nothing here prints where a call was made, or which thread or process made it: not
    # collecting them makes every record cheaper (the logging HOWTO's "Optimization").
    logging._srcfile = None  # noqa: SLF001 - the documented knob
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingHandler(
        stream if stream is not None else sys.stdout,
        linger_s=linger_s,
        max_linger_s=max_linger_s,
    )
    handler.setFormatter(LineFormatter(fmt or log_format(), service=service))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    _handler = handler
    if access_log is None:
        access_log = os.environ.get("SHOP_ACCESS_LOG", "").strip().lower() not in _OFF
    on = access_log and logging.getLogger().isEnabledFor(logging.INFO)
    _access_handler = handler if on else None


def stop_logging() -> None:
    """Write out what is still buffered and stop the writer (at exit)."""
    global _handler, _access_handler  # noqa: PLW0603 - one handler per process
    _access_handler = None
    if _handler is not None:
        _handler.close()
        _handler = None


def _flush_on_sigterm() -> None:
    """SIGTERM kills without running ``atexit`` (uvicorn, too, re-raises it after its
    shutdown): write the buffered lines first, then die of the signal as before. Only when
    nobody else handles SIGTERM, and only from the main thread (where signals are set)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def flush_then_die(signum: int, frame: FrameType | None) -> None:
        if _handler is not None:
            _handler.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, flush_then_die)
