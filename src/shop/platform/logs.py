"""Log lines of a service process: cheap on the event loop, written by a thread of its own.

The standard ``QueueHandler``/``QueueListener`` pair wakes the listener thread for every
record (a futex wake and a GIL hand-off per line) and formats each record twice on the
loop; under load that was a fifth of the notification service's CPU. Here the loop only
renders the message (``record.getMessage()``, so arguments changed later cannot change the
line) and appends the record to a buffer. The first record after a quiet spell wakes the
writer, which then writes what gathered every ``linger_s`` (a few ms), formatted, with one
``write``, until a wait finds nothing. So there is at most one wake and one system call per
``linger_s`` however many lines; lines appear within a few milliseconds, in order; and a
slow reader of stdout (a busy launcher, a full pipe) only ever blocks the writer thread,
never the loop.

The buffer is bounded (``capacity`` records): when the writer is that far behind, new
records are dropped and counted, and the writer says how many once it catches up. What is
buffered is written at exit (``atexit``) and on SIGTERM before the process dies of it.
The standard library has no batching handler, hence this small one.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import TextIO

__all__ = ["BatchingHandler", "configure_logging", "stop_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)-5s %(name)s: %(message)s"


class BatchingHandler(logging.Handler):
    """Buffers records on the caller's thread; a writer thread formats and writes them in
    batches (see the module docstring)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        linger_s: float = 0.005,
        capacity: int = 10_000,
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        self._stream = stream
        self._linger_s = linger_s
        self._capacity = capacity
        # deque.append and popleft are atomic: the loop never takes a lock to log.
        self._records: collections.deque[logging.LogRecord] = collections.deque()
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
        self._records.append(record)
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
        """While lines keep coming, one batch every ``linger_s`` with no wake from the
        loggers; once a wait finds nothing, sleep until the next record wakes us."""
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                # Let the batch gather; closing cuts the wait short.
                closing = self._closing.wait(self._linger_s)
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
        while records:
            try:
                record = records.popleft()
            except IndexError:  # another thread (flush at exit) took it
                break
            try:
                lines.append(self.format(record))
            except Exception:
                self.handleError(record)
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


def configure_logging(
    level: str = "INFO", *, stream: TextIO | None = None, linger_s: float = 0.005
) -> None:
    """Root logging for a service process: one line per record on stdout (``stream``), in
    ``LOG_FORMAT``, written in batches (gathered for ``linger_s``) by a thread of its own;
    flushed at exit and on SIGTERM. Called again, it replaces the handler (flushing the old
    one)."""
    global _handler  # noqa: PLW0603 - one handler per process
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
    handler = BatchingHandler(stream if stream is not None else sys.stdout, linger_s=linger_s)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    _handler = handler


def stop_logging() -> None:
    """Write out what is still buffered and stop the writer (at exit)."""
    global _handler  # noqa: PLW0603 - one handler per process
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
