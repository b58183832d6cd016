"""Log lines of a service process: batched by a writer thread, yet complete, in order and
prompt; written out at exit and on SIGTERM; a blocked stdout costs lines, never the loop.
Inside a request they carry its ids; access lines come in the same two formats."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from shop.platform import context, logs
from shop.platform.logs import LOG_FORMAT, BatchingHandler, LineFormatter


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


class LinesMeanwhile(threading.Event):
    """The writer's between-batches wait (``_closing``), during which ``lines`` more lines
    arrive each time, as under a steady load; records how long the writer chose to wait."""

    def __init__(self, log: logging.Logger, lines: int) -> None:
        super().__init__()
        self.log = log
        self.lines = lines
        self.waits: list[float | None] = []
        self.quiet = threading.Event()  # set by the first wait that finds no new line

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if self.lines:
            self.lines -= 1
            self.log.info("line %d", len(self.waits))
        else:
            self.quiet.set()
        return super().wait(timeout)


def test_a_steady_stream_is_written_in_ever_fewer_batches_a_first_line_promptly() -> None:
    out = io.StringIO()
    handler = BatchingHandler(out, linger_s=0.001, max_linger_s=0.008)
    log = logger_to(handler, "test.logs.steady")
    meanwhile = LinesMeanwhile(log, lines=5)
    handler._closing = meanwhile  # noqa: SLF001 - lines arrive during each of the writer's waits
    log.info("first")
    assert meanwhile.quiet.wait(5)
    # The first line waits the shortest time; while lines keep coming, each batch waits
    # twice as long as the last, up to the most; the wait that finds none is the last.
    assert meanwhile.waits == [0.001, 0.002, 0.004, 0.008, 0.008, 0.008]
    handler.close()
    assert out.getvalue().splitlines() == ["first", *(f"line {n}" for n in range(1, 6))]


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


def collected(handler: BatchingHandler, out: io.StringIO) -> list[str]:
    handler.close()
    return out.getvalue().splitlines()


def test_a_line_inside_a_request_carries_its_ids_and_the_service_outside_none() -> None:
    out = io.StringIO()
    handler = BatchingHandler(out)
    handler.setFormatter(LineFormatter("text", service="order-service"))
    log = logger_to(handler, "test.logs.ids")
    trace = context.TraceContext.new()

    def in_a_request() -> None:
        context.bind(request_id="req-7", trace=trace)
        log.warning("refused %s", "o-1")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it failed")

    log.info("outside")
    contextvars.copy_context().run(in_a_request)
    lines = collected(handler, out)
    ids = f"service=order-service request_id=req-7 trace_id={trace.trace_id}"
    ids += f" span_id={trace.span_id}"
    assert lines[0].endswith(" INFO  test.logs.ids: outside")
    assert lines[1].endswith(f" WARNING test.logs.ids: refused o-1 {ids}")
    assert lines[2].endswith(f"it failed {ids}")  # the ids on the line, before the traceback
    assert lines[3] == "Traceback (most recent call last):"


def test_json_lines_are_one_object_each_with_the_ids_as_fields() -> None:
    out = io.StringIO()
    handler = BatchingHandler(out)
    handler.setFormatter(LineFormatter("json", service="inventory-service"))
    log = logger_to(handler, "test.logs.json")
    trace = context.TraceContext.new()

    def in_a_request() -> None:
        context.bind(request_id="req-8", trace=trace)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it failed: %s", "line\nbreak")

    contextvars.copy_context().run(in_a_request)
    (line,) = collected(handler, out)
    fields = json.loads(line)
    assert fields["level"] == "ERROR"
    assert fields["logger"] == "test.logs.json"
    assert fields["message"] == "it failed: line\nbreak"
    assert fields["service"] == "inventory-service"
    assert (fields["request_id"], fields["trace_id"], fields["span_id"]) == (
        "req-8",
        trace.trace_id,
        trace.span_id,
    )
    assert "RuntimeError: boom" in fields["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["ts"])


def test_access_lines_are_written_by_the_writer_in_both_formats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace = context.TraceContext.new()
    for fmt in ("text", "json"):
        out = io.StringIO()
        handler = BatchingHandler(out)
        handler.setFormatter(LineFormatter(fmt, service="order-service"))
        monkeypatch.setattr(logs, "_access_handler", handler)
        logs.access("order-service", "GET", "/orders/{id}", 404, 0.00125, "req-9", trace)
        (line,) = collected(handler, out)
        if fmt == "text":
            assert line.endswith(
                " INFO  access: GET /orders/{id} 404 1.25ms service=order-service"
                f" request_id=req-9 trace_id={trace.trace_id} span_id={trace.span_id}"
            )
        else:
            fields = json.loads(line)
            assert {k: fields[k] for k in ("logger", "method", "route", "status")} == {
                "logger": "access",
                "method": "GET",
                "route": "/orders/{id}",
                "status": 404,
            }
            assert fields["duration_ms"] == 1.25
            assert (fields["request_id"], fields["trace_id"]) == ("req-9", trace.trace_id)


def test_no_access_lines_when_switched_off_or_above_info(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setenv("SHOP_ACCESS_LOG", "false")
    try:
        for level, on in (("INFO", False), ("WARNING", True), ("INFO", None)):
            logs.configure_logging(level, stream=out, fmt="text", access_log=on)
            logs.access("s", "GET", "/x", 200, 0.001, "req", None)
            logs.stop_logging()
    finally:
        root.handlers, root.level = saved[0], saved[1]
    assert out.getvalue() == ""


def test_the_format_is_text_unless_json_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOP_LOG_FORMAT", raising=False)
    assert logs.log_format() == "text"
    monkeypatch.setenv("SHOP_LOG_FORMAT", "JSON")
    assert logs.log_format() == "json"
    monkeypatch.setenv("SHOP_LOG_FORMAT", "text")
    assert logs.log_format() == "text"
