"""A pre-importing fork server: each service is a fork of one process that imported the heavy
common modules (FastAPI, pydantic, SQLAlchemy, Alembic, aiohttp, uvicorn, ``shop.platform``).

Importing them costs a service process about 3 s of CPU, seven times over, and ~80 MiB each.
Forked from the zygote, a service only imports its own package (0.02–0.15 s) and shares the
imported pages with its siblings copy-on-write (``gc.freeze()`` keeps the collector from
writing to them).

The launcher starts ``python -c '…zygote import main…' FD`` with one end of a Unix
``SOCK_SEQPACKET`` pair. Each request is one message: JSON (module, argv, environment) with
two file descriptors, the write end of the service's output pipe and one end of a socket pair
on which the zygote answers ``pid N`` after the fork and ``exit CODE`` when the service has
ended (``-N`` for a signal, as ``asyncio`` reports it). The zygote runs no thread and no event
loop; it exits when the launcher closes its end.

Each service is still its own process: its own session and process group, stdout and stderr
on its own pipe, its own environment, ``PR_SET_PDEATHSIG`` tied to the zygote (which has it
tied to the launcher), ``python -m <module>`` semantics through ``runpy``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import gc
import importlib
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "MALLOC_TUNING",
    "PRELOAD",
    "SECRET_VARIABLES",
    "ForkedProcess",
    "Zygote",
    "die_with_launcher",
    "fork_server_wanted",
    "main",
    "zygote_environment",
]

# What every service imports; the rest (the service's own package) is imported after the fork.
# Drivers only the production profile uses (aiokafka, pymongo) are left to the services.
PRELOAD: tuple[str, ...] = (
    "fastapi",
    "fastapi.security",
    "starlette.applications",
    "pydantic",
    # FastAPI imports it while building the first route, to tell v1 models apart: otherwise
    # each service imported it after the fork (0.09 s of CPU each, 0.5 s on a loaded core).
    "pydantic.v1",
    "pydantic_settings",
    "sqlalchemy",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.orm",
    "aiohttp",
    "encodings.idna",
    "uvicorn",
    "uvicorn.lifespan.on",
    "uvicorn.loops.auto",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.loops.uvloop",
    "alembic.command",
    "alembic.config",
    "alembic.runtime.migration",
    "prometheus_client",
    "argon2",
    "jwt",
    "shop.platform.app",
    "shop.platform.buses",
    "shop.platform.context",
    "shop.platform.db",
    "shop.platform.discovery",
    "shop.platform.events",
    "shop.platform.http",
    "shop.platform.inbox",
    "shop.platform.lease",
    "shop.platform.middleware",
    "shop.platform.outbox",
    "shop.platform.problems",
    "shop.platform.security",
    "shop.platform.serve",
    "shop.platform.settings",
    "shop.platform.tokens",
    "shop.platform.worker",
)

FORK_SERVER = "SHOP_FORK_SERVER"  # "0" turns the fork server off: every service is exec'd
_PR_SET_PDEATHSIG = 1
_MAX_REQUEST = 1 << 20


# Each service's own secret, or every service's: given per service by the supervisor, never to
# the zygote, whose initial environment block every fork would keep (/proc/<pid>/environ).
# The same names as shop.launcher.settings (a unit test checks), which this module cannot
# import: it runs before the launcher's heavy imports.
SECRET_VARIABLES = (
    "REGISTRY_CLIENTS",
    "REGISTRY_CLIENTS_FILE",
    "AUTH_SERVICE_CLIENTS",
    "SHOP_SERVICE_SECRET",
)


# glibc's allocator, read once at process start, unless the operator set them:
# - MALLOC_ARENA_MAX: glibc gives each thread that allocates its own arena, kept after the
#   thread is idle: auth hashing passwords in worker threads held ~20 MiB more for it.
# - MALLOC_MMAP_THRESHOLD_: a fixed threshold turns off glibc's sliding one, which after the
#   first freed argon2 work buffer (19 MiB) kept every later one in the heap: auth held
#   ~19 MiB more PSS after a few logins (measured 69.7 → 50.7 MiB; CPU per order unchanged).
MALLOC_TUNING: Mapping[str, str] = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576"}


def zygote_environment(base: Mapping[str, str]) -> dict[str, str]:
    """What the zygote starts with: what is read once at interpreter start (PYTHONPATH,
    MALLOC_TUNING...) applies to every fork; each fork then gets its own ``os.environ``."""
    env = {k: v for k, v in base.items() if k not in SECRET_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in MALLOC_TUNING.items():
        env.setdefault(name, value)
    return env


def die_with_launcher() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when the launcher dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    launcher = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm)
        # The launcher died between fork and prctl: nobody would ever stop this child.
        if os.getppid() != launcher:
            os._exit(1)

    return preexec


def fork_server_wanted(environment: Mapping[str, str]) -> bool:
    """Linux only (``SOCK_SEQPACKET``, ``PR_SET_PDEATHSIG``), unless turned off."""
    return sys.platform.startswith("linux") and environment.get(FORK_SERVER, "1") != "0"


# -- the zygote's side ---------------------------------------------------------------------


def _preload(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the service imports it again and says why
            print(f"zygote: could not preload {name}: {exc!r}", file=sys.stderr, flush=True)
    if threading.active_count() != 1:
        # A thread does not survive a fork: forking now could leave a lock held forever.
        raise RuntimeError(f"a preloaded module started a thread: {threading.enumerate()}")


def _exit_code(value: object) -> int:
    """What ``sys.exit(value)`` makes the interpreter exit with."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _become_service(request: dict[str, Any], output: int, zygote: int) -> int:
    """In the forked child: take the service's output, session, environment and argv, then run
    its module as ``python -m`` would. Returns the exit code."""
    os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != zygote:
            return 1  # the zygote died between fork and prctl: nobody would stop this child
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [request["module"], *request["args"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return _exit_code(exc.code)
    except KeyboardInterrupt:
        return 128 + int(signal.SIGINT)
    except BaseException:  # noqa: BLE001 - reported as the interpreter would, exit code 1
        traceback.print_exc()
        return 1
    return 0


def _fork(request: dict[str, Any], output: int, *, close_in_child: Callable[[], None]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    zygote = os.getpid()
    pid = os.fork()
    if pid:
        os.close(output)
        return pid
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        close_in_child()
        code = _become_service(request, output, zygote)
    except BaseException:  # noqa: BLE001 - never return into the zygote's loop
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _serve(control: socket.socket) -> None:
    waiting: dict[int, socket.socket] = {}  # pid -> where to tell its exit code
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    forking: list[socket.socket] = []  # the answer socket of the fork being made

    def close_in_child() -> None:
        control.close()
        for answer in (*waiting.values(), *forking):
            answer.close()
        os.close(wake_read)
        os.close(wake_write)

    def reap() -> None:
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            answer = waiting.pop(pid, None)
            if answer is not None:
                with contextlib.suppress(OSError):
                    answer.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                answer.close()

    while True:
        readable, _, _ = select.select([control.fileno(), wake_read], [], [])
        if wake_read in readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_read, 512):
                    pass
            reap()
        if control.fileno() not in readable:
            continue
        message, fds, _, _ = socket.recv_fds(control, _MAX_REQUEST, 2)
        if not message:
            return  # the launcher is gone or done
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        output, answer_fd = fds
        answer = socket.socket(fileno=answer_fd)
        forking[:] = [answer]
        try:
            pid = _fork(json.loads(message), output, close_in_child=close_in_child)
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                os.close(output)
            with contextlib.suppress(OSError):
                answer.sendall(f"error {exc}\n".encode())
            answer.close()
            continue
        with contextlib.suppress(OSError):
            answer.sendall(f"pid {pid}\n".encode())
        waiting[pid] = answer
        reap()  # it may have ended already


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    control = socket.socket(fileno=int(args[0]))
    _preload(PRELOAD)
    # Objects made so far are never collected: the collector does not write to their pages,
    # so the forks keep sharing them.
    gc.collect()
    gc.freeze()
    _serve(control)
    return 0


# -- the launcher's side -------------------------------------------------------------------


class ForkedProcess:
    """A service forked by the zygote: what the supervisor needs of a process."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader, exited: asyncio.Future[int]):
        self.pid = pid
        self.stdout: asyncio.StreamReader | None = stdout
        self.returncode: int | None = None
        self.exited = exited
        exited.add_done_callback(self._ended)

    def _ended(self, exited: asyncio.Future[int]) -> None:
        if not exited.cancelled():
            self.returncode = exited.result()


class Zygote:
    """The launcher's handle on the fork server: ``begin()`` it, ``fork()`` services,
    ``close()`` it once they have stopped."""

    def __init__(self, *, limit: int = 1 << 20) -> None:
        self._limit = limit
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._lost = False

    @classmethod
    def begin(cls, environment: Mapping[str, str], *, limit: int = 1 << 20) -> Zygote:
        """Start it importing now (no event loop needed); OSError if it cannot be started."""
        zygote = cls(limit=limit)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            zygote._process = subprocess.Popen(  # noqa: S603 - this interpreter, a constant
                [
                    sys.executable,
                    # Not ``-m``: the package would import this module before running it.
                    "-c",
                    "import sys; from shop.launcher.zygote import main; sys.exit(main())",
                    str(theirs.fileno()),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=zygote_environment(environment),
                # Out of the terminal's process group: Ctrl-C is the launcher's to handle.
                start_new_session=True,
                preexec_fn=die_with_launcher(),
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        zygote._control = mine
        return zygote

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def alive(self) -> bool:
        """False once it has died (or was closed): its services were sent SIGTERM with it, and
        it forks nothing more. Known as soon as a service's exit went unanswered."""
        return self._process is not None and self._process.poll() is None and not self._lost

    def exit_code(self, timeout_s: float = 0.0) -> int | None:
        """Its own exit code (``-N`` for a signal) once it has ended, waiting up to ``timeout_s``
        (blocking: from a thread), else None. Its sockets close a moment before it can be
        reaped, so whoever learns of its death that way waits a little for the code."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    async def fork(self, module: str, *, env: Mapping[str, str]) -> ForkedProcess:
        """``python -m module`` as a fork of the zygote; OSError if it cannot be made."""
        if self._control is None:
            raise OSError("the fork server is not running")
        loop = asyncio.get_running_loop()
        output_read, output_write = os.pipe()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        request = json.dumps({"module": module, "args": [], "env": dict(env)}).encode()
        try:
            socket.send_fds(self._control, [request], [output_write, theirs.fileno()])
        except OSError:
            os.close(output_read)
            mine.close()
            raise
        finally:
            os.close(output_write)
            theirs.close()
        stdout = asyncio.StreamReader(limit=self._limit, loop=loop)
        pipe = os.fdopen(output_read, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout, loop=loop), pipe)
        answers, writer = await asyncio.open_unix_connection(sock=mine)
        first = (await answers.readline()).decode().split()
        if len(first) != 2 or first[0] != "pid":
            writer.close()
            stdout.feed_eof()
            pipe.close()
            raise OSError(" ".join(first[1:]) or "the fork server ended")
        exited: asyncio.Future[int] = loop.create_future()
        watcher = asyncio.create_task(self._watch(answers, writer, exited))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return ForkedProcess(int(first[1]), stdout, exited)

    async def _watch(
        self,
        answers: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        exited: asyncio.Future[int],
    ) -> None:
        try:
            last = (await answers.readline()).decode().split()
        finally:
            writer.close()
        if len(last) == 2 and last[0] == "exit":
            code = int(last[1])
        else:
            # No answer: the zygote itself died; its children were sent SIGTERM with it. Said
            # before the exit is, so that whoever learns of the exit learns of this too.
            self._lost = True
            code = -int(signal.SIGTERM)
        if not exited.done():
            exited.set_result(code)

    def close(self) -> None:
        """End it, idempotently. Called once the services it forked have been stopped (or
        none was), so there is nothing to wait for: it may still be importing."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


if __name__ == "__main__":
    sys.exit(main())
