"""Log lines of a service process: batched by a writer thread, yet complete, in order and
prompt; written out at exit and on SIGTERM; a blocked stdout costs lines, never the loop."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from shop.platform.logs import LOG_FORMAT, BatchingHandler


class SlowStream(io.StringIO):
    """A stdout whose reader stalls until told to go on."""

    def __init__(self) -> None:
        super().__init__()
        self.go_on = threading.Event()

    def write(self, text: str) -> int:
        self.go_on.wait()
        return super().write(text)


def logger_to(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_lines_arrive_in_order_formatted_once_and_promptly() -> None:
    out = io.StringIO()
    handler = BatchingHandler(out)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log = logger_to(handler, "test.logs.order")
    for i in range(500):
        log.info("line %d", i)
    deadline = time.monotonic() + 5
    while out.getvalue().count("\n") < 500 and time.monotonic() < deadline:
        time.sleep(0.001)
    handler.close()
    lines = out.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [f"line {i}" for i in range(500)]
    assert " INFO  test.logs.order: line 0" in lines[0]  # one prefix, not two


def test_arguments_are_rendered_when_logged_not_when_written() -> None:
    out = io.StringIO()
    handler = BatchingHandler(out, linger_s=0.05)
    log = logger_to(handler, "test.logs.args")
    seen: list[str] = ["before"]
    log.info("%s", seen)
    seen[0] = "after"
    handler.close()
    assert out.getvalue() == "['before']\n"


def test_a_traceback_is_written_with_its_line() -> None:
    out = io.StringIO()
    handler = BatchingHandler(out)
    log = logger_to(handler, "test.logs.exc")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    handler.close()
    text = out.getvalue()
    assert text.startswith("it failed\nTraceback (most recent call last):")
    assert "RuntimeError: boom" in text


def test_a_blocked_stdout_drops_lines_beyond_the_buffer_and_says_so() -> None:
    out = SlowStream()
    handler = BatchingHandler(out, capacity=10, linger_s=0)
    log = logger_to(handler, "test.logs.full")
    log.info("first")  # the writer takes it and blocks on the stalled stream
    deadline = time.monotonic() + 5
    while handler._records and time.monotonic() < deadline:  # noqa: SLF001 - waits for the writer
        time.sleep(0.001)
    started = time.monotonic()
    for i in range(100):
        log.info("line %d", i)
    assert time.monotonic() - started < 1.0  # logging never waited for the stream
    out.go_on.set()
    handler.close()
    lines = out.getvalue().splitlines()
    assert lines[:11] == ["first", *(f"line {i}" for i in range(10))]
    assert lines[11] == "[90 log lines were dropped: stdout was not being read]"


def test_buffered_lines_are_written_at_exit_and_on_sigterm() -> None:
    script = textwrap.dedent(
        """
        import logging, os, signal, sys
        from shop.platform.logs import configure_logging
        configure_logging("INFO", linger_s=30)  # only the exit or the signal writes them
        for i in range(3):
            logging.getLogger("t").info("line %d", i)
        if sys.argv[1] == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            raise SystemExit("not reached")
        """
    )
    for how in ("exit", "term"):
        done = subprocess.run(
            [sys.executable, "-c", script, how],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ},
            check=False,
        )
        lines = done.stdout.splitlines()
        assert [line.split(": ", 1)[1] for line in lines] == ["line 0", "line 1", "line 2"]
        assert done.returncode == (-signal.SIGTERM if how == "term" else 0)
