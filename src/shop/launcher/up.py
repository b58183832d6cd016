"""``shop up`` itself, once ``shop.launcher.cli`` has started the fork server.

Exit codes: 0 after Ctrl-C, SIGTERM or SIGHUP stopped everything cleanly; 1 when a service
failed to start, crashed more often than ``--max-restarts`` allows, refused its settings, or was
not ready in time (everything else is stopped too); 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from shop.launcher.console import LAUNCHER, Console
from shop.launcher.services import (
    SERVICES,
    ServicesFileError,
    ServiceSpec,
    load_services_file,
    parse_scale,
    runnable,
    scaled,
    with_ports,
)
from shop.launcher.settings import LauncherSettings, child_environment
from shop.launcher.supervisor import RestartPolicy, ServiceFailed, Supervisor
from shop.launcher.zygote import Zygote
from shop.platform.settings import PlatformSettings, Profile, describe_invalid

__all__ = ["main"]

# The storefront's registered name: with it running, the summary leads with its URL.
STOREFRONT = "web-service"

EXIT_STOPPED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# SIGHUP: the terminal that ran ``shop up`` was closed; stop as cleanly as for Ctrl-C.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not between 0 and 65535")
    return port


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _restarts(text: str) -> int:
    if not text.isdigit() or int(text) > 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of restarts from 0 to 100")
    return int(text)


def _scale(text: str) -> dict[str, int]:
    try:
        return parse_scale(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser(settings: LauncherSettings, platform: PlatformSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shop", description="Run the Shop on this machine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser(
        "up",
        help="start every service, wait until each is ready, stop them all on Ctrl-C",
        description="Start every service on the embedded profile (unless SHOP_PROFILE says "
        "otherwise), wait until each is ready, and stop them all on Ctrl-C or SIGTERM.",
    )
    up.add_argument(
        "--profile",
        choices=("embedded", "production"),
        default=platform.profile,
        help="embedded: SQLite files and the embedded event log under --data-dir; production: "
        "the databases, bus and secrets the environment names (env SHOP_PROFILE, default "
        "embedded)",
    )
    up.add_argument(
        "--scale",
        type=_scale,
        default={},
        metavar="NAME=N[,NAME=N]",
        help="run N instances of a service, e.g. order=2,inventory=2,notification=2",
    )
    up.add_argument(
        "--registry-port",
        type=_port,
        metavar="PORT",
        default=settings.registry_port,
        help="port of the registry, 0 for any free one (env REGISTRY_PORT, default 8761)",
    )
    up.add_argument(
        "--gateway-port",
        type=_port,
        metavar="PORT",
        default=settings.gateway_port,
        help="port of the gateway, 0 for any free one (env GATEWAY_PORT, default 8765)",
    )
    up.add_argument(
        "--data-dir",
        type=Path,
        metavar="PATH",
        default=None,
        help="where the embedded profile keeps its files (env SHOP_DATA_DIR, default ./.data)",
    )
    up.add_argument(
        "--ready-timeout",
        type=_seconds,
        default=settings.ready_timeout_s,
        metavar="SECONDS",
        help="how long each service may take to become ready (env SHOP_READY_TIMEOUT, default 60)",
    )
    up.add_argument(
        "--stop-timeout",
        type=_seconds,
        default=settings.stop_timeout_s,
        metavar="SECONDS",
        help="how long each service may take to stop before it is killed "
        "(env SHOP_STOP_TIMEOUT, default 10)",
    )
    up.add_argument(
        "--max-restarts",
        type=_restarts,
        default=settings.max_restarts,
        metavar="N",
        help="restart a service that crashes after start-up at most N times within 60 s, "
        "then stop everything; 0 stops everything at the first crash "
        "(env SHOP_MAX_RESTARTS, default 5)",
    )
    up.add_argument(
        "--services-file",
        type=Path,
        metavar="FILE",
        default=None,
        help="JSON service table replacing the built-in one (tests, partial systems)",
    )
    return parser


def main(argv: Sequence[str] | None = None, *, zygote: Zygote | None = None) -> int:
    """``zygote``: a fork server already importing; the supervisor adopts it."""
    try:
        settings = LauncherSettings()
        platform = PlatformSettings()
    except ValidationError as exc:
        model = PlatformSettings if exc.title == PlatformSettings.__name__ else LauncherSettings
        print(f"shop: {describe_invalid(exc, model)}", file=sys.stderr)
        return EXIT_USAGE
    args = _parser(settings, platform).parse_args(argv)
    try:
        return _up(args, settings=settings, platform=platform, zygote=zygote)
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were installed: nothing was started yet.
        return EXIT_STOPPED


def _up(
    args: argparse.Namespace,
    *,
    settings: LauncherSettings,
    platform: PlatformSettings,
    zygote: Zygote | None,
) -> int:
    try:
        table: Sequence[ServiceSpec] = (
            load_services_file(args.services_file) if args.services_file else SERVICES
        )
    except ServicesFileError as exc:
        print(f"shop up: bad --services-file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    present, missing = runnable(table)
    try:
        present = scaled(present, args.scale)
    except ValueError as exc:
        print(f"shop up: bad --scale: {exc}", file=sys.stderr)
        return EXIT_USAGE
    services = with_ports(present, registry=args.registry_port, gateway=args.gateway_port)
    console = Console(sys.stdout, names=[LAUNCHER, *(s.name for s in services)])
    for spec in missing:
        console.note(f"skipping {spec.name}: {spec.module} has no __main__ yet")
    if not services:
        console.banner("no service to start")
        return EXIT_FAILED
    data_dir: Path = (args.data_dir or platform.data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    environment = child_environment(
        os.environ,
        data_dir=data_dir,
        profile=args.profile,
        registrants=[s.registers_as for s in services if s.registers_as],
        internal_callers=[s.registers_as for s in services if s.registers_as and s.calls_internal],
    )
    try:
        supervisor = Supervisor(
            services,
            environment=environment,
            console=console,
            ready_timeout_s=args.ready_timeout,
            stop_timeout_s=args.stop_timeout,
            zygote=zygote,
            restart=RestartPolicy(limit=args.max_restarts),
        )
    except ValueError as exc:
        print(f"shop up: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(
        _supervise(
            supervisor,
            console=console,
            settings=settings,
            profile=args.profile,
            data_dir=data_dir,
            storefront=any(s.registers_as == STOREFRONT for s in services),
        )
    )


async def _supervise(
    supervisor: Supervisor,
    *,
    console: Console,
    settings: LauncherSettings,
    profile: Profile,
    data_dir: Path,
    storefront: bool = False,
) -> int:
    began = time.monotonic()
    stop_requested = asyncio.Event()
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            console.note(f"{sig.name} received: stopping (again to kill at once)")
            stop_requested.set()
        else:
            supervisor.hurry()

    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)

    stopping = asyncio.create_task(stop_requested.wait())
    starting = asyncio.create_task(supervisor.start())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServiceFailed):
                await starting
            await supervisor.stop()
            return EXIT_STOPPED
        try:
            starting.result()
        except ServiceFailed:
            return EXIT_FAILED  # reported and stopped by the supervisor
        _print_summary(
            supervisor,
            console=console,
            settings=settings,
            profile=profile,
            data_dir=data_dir,
            took_s=time.monotonic() - began,
            storefront=storefront,
        )
        crashing = asyncio.create_task(supervisor.wait())
        await asyncio.wait({crashing, stopping}, return_when=asyncio.FIRST_COMPLETED)
        failure = crashing.result() if crashing.done() else None
        crashing.cancel()
        await asyncio.gather(crashing, return_exceptions=True)
        await supervisor.stop()
        if failure is not None:
            return EXIT_FAILED
        console.note("every service stopped")
        return EXIT_STOPPED
    finally:
        stopping.cancel()
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def _print_summary(
    supervisor: Supervisor,
    *,
    console: Console,
    settings: LauncherSettings,
    profile: Profile,
    data_dir: Path,
    took_s: float,
    storefront: bool = False,
) -> None:
    rows: list[tuple[str, str]] = []
    gateway = supervisor.url_of_role("gateway")
    registry = supervisor.url_of_role("registry")
    if gateway and storefront:
        # What a newcomer opens first: the shop itself, served at the gateway's root.
        rows.append(("storefront", f"{gateway}/"))
    if gateway:
        rows += [("gateway", gateway), ("API docs", f"{gateway}/docs")]
    if registry:
        rows.append(("registry", f"{registry}/eureka/web"))
    if profile == "production":
        rows.append(("admin login", f"{settings.admin_email} (password from AUTH_ADMIN_PASSWORD)"))
    else:
        rows.append(("admin login", f"{settings.admin_email} / {settings.admin_password}"))
        rows.append(("data", str(data_dir)))
    shown = {gateway, registry}
    rows += [(name, url) for name, url in supervisor.urls.items() if url not in shown]
    console.summary(
        f"Shop is up in {took_s:.1f} s ({profile} profile)",
        rows,
        "Press Ctrl-C to stop.",
    )
