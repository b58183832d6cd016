"""The table of processes ``shop up`` runs: adding a service is one line in ``SERVICES``."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import TypeAdapter, ValidationError

__all__ = [
    "SERVICES",
    "Role",
    "ServiceSpec",
    "ServicesFileError",
    "check_table",
    "has_main",
    "load_services_file",
    "parse_scale",
    "runnable",
    "scaled",
    "with_ports",
]

_APP_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,255}")

# A laptop's worth: more instances than this of one service is a typo, not a topology.
MAX_INSTANCES = 16

# The registry starts alone and first (the others register with it); the gateway's
# URL is the one the summary leads with; auth runs once, on a port the launcher picks up
# front, so every process can be told where its keys and service tokens come from.
Role = Literal["registry", "gateway", "auth", "service"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    """One process: ``python -m <module>``, or ``command`` (stand-ins in tests).

    ``registers_as``: the application name it registers with the discovery server
    (``auth-service``...); it gets that application's registry credential. Scaled instances
    share it. ``calls_internal``: it calls other services' internal APIs, so it gets its
    own service secret (auth gets the table of them); the others get none."""

    name: str
    module: str | None = None
    command: tuple[str, ...] = ()
    port: int = 0
    port_env: str | None = None
    role: Role = "service"
    registers_as: str | None = None
    calls_internal: bool = False

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"service name {self.name!r} must be one word")
        if bool(self.module) == bool(self.command):
            raise ValueError(f"service {self.name!r} needs exactly one of module or command")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"service {self.name!r}: port {self.port} is out of range")
        if self.registers_as is not None and not _APP_NAME.fullmatch(self.registers_as):
            raise ValueError(f"service {self.name!r}: {self.registers_as!r} is no application name")
        if self.registers_as is not None and self.role == "registry":
            raise ValueError(f"service {self.name!r}: the registry registers with nobody")
        if self.role == "auth" and not self.port_env:
            raise ValueError(f"service {self.name!r}: auth is told its port (give port_env)")
        if self.calls_internal and self.registers_as is None:
            raise ValueError(f"service {self.name!r}: a service secret needs a name to go with")

    def argv(self) -> tuple[str, ...]:
        if self.command:
            return self.command
        return (sys.executable, "-m", str(self.module))

    def describe(self) -> str:
        return " ".join(self.command) if self.command else f"python -m {self.module}"


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        name="registry",
        module="shop.registry",
        port=8761,
        port_env="REGISTRY_PORT",
        role="registry",
    ),
    ServiceSpec(
        name="gateway",
        module="shop.gateway",
        port=8765,
        port_env="GATEWAY_PORT",
        role="gateway",
        registers_as="api-gateway",
    ),
    ServiceSpec(
        name="auth",
        module="shop.auth",
        role="auth",
        port_env="AUTH_PORT",
        registers_as="auth-service",
    ),
    # Port 0: any free one at start; a restart is told the one it had (``port_env``).
    ServiceSpec(
        name="product",
        module="shop.product",
        port_env="PRODUCT_PORT",
        registers_as="product-service",
    ),
    ServiceSpec(
        name="inventory",
        module="shop.inventory",
        port_env="INVENTORY_PORT",
        registers_as="inventory-service",
    ),
    ServiceSpec(
        name="order",
        module="shop.order",
        port_env="ORDER_PORT",
        registers_as="order-service",
        calls_internal=True,
    ),
    ServiceSpec(
        name="notification",
        module="shop.notification",
        port_env="NOTIFICATION_PORT",
        registers_as="notification-service",
    ),
    # The storefront (docs/storefront.md): the gateway routes / and /shop/... to it.
    ServiceSpec(
        name="web",
        module="shop.web",
        port_env="WEB_PORT",
        registers_as="web-service",
    ),
)


def has_main(module: str) -> bool:
    """Whether ``python -m module`` can run, without importing the service itself."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "__main__.py").is_file() for p in spec.submodule_search_locations)


def runnable(specs: Iterable[ServiceSpec]) -> tuple[list[ServiceSpec], list[ServiceSpec]]:
    """Split the table into what can run now and services whose package is not written yet."""
    present: list[ServiceSpec] = []
    missing: list[ServiceSpec] = []
    for spec in specs:
        (present if spec.module is None or has_main(spec.module) else missing).append(spec)
    return present, missing


def with_ports(
    specs: Iterable[ServiceSpec], *, registry: int | None = None, gateway: int | None = None
) -> list[ServiceSpec]:
    """The table with the registry's and the gateway's ports replaced (``--registry-port``...)."""
    ports: dict[Role, int | None] = {"registry": registry, "gateway": gateway}
    out: list[ServiceSpec] = []
    for spec in specs:
        port = ports.get(spec.role)
        out.append(spec if port is None else replace(spec, port=port))
    return out


def parse_scale(text: str) -> dict[str, int]:
    """``order=2,inventory=2`` as {name: instances}; raises ValueError saying what is wrong."""
    counts: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, number = part.partition("=")
        name = name.strip()
        if not sep or not name or not number.strip().isdigit():
            raise ValueError(f"{part!r} is not NAME=COUNT")
        count = int(number)
        if not 1 <= count <= MAX_INSTANCES:
            raise ValueError(f"{name}: {count} instances; give 1 to {MAX_INSTANCES}")
        if name in counts:
            raise ValueError(f"{name} is given twice")
        counts[name] = count
    return counts


def scaled(specs: Iterable[ServiceSpec], counts: Mapping[str, int]) -> list[ServiceSpec]:
    """The table with ``counts[name]`` instances of each named service: ``order-1``,
    ``order-2``... Only services scale: the registry, the gateway and auth own fixed ports."""
    table = list(specs)
    by_name = {s.name: s for s in table}
    for name in counts:
        spec = by_name.get(name)
        if spec is None:
            raise ValueError(f"there is no service {name!r} (services: {', '.join(by_name)})")
        if spec.role != "service" and counts[name] != 1:
            raise ValueError(f"{name} runs once: it listens on a fixed port")
    out: list[ServiceSpec] = []
    for spec in table:
        count = counts.get(spec.name, 1)
        if count == 1:
            out.append(spec)
        else:
            out += [replace(spec, name=f"{spec.name}-{n}") for n in range(1, count + 1)]
    return out


class ServicesFileError(ValueError):
    """The ``--services-file`` is not a valid service table."""


_TABLE = TypeAdapter(list[ServiceSpec])


def load_services_file(path: Path) -> list[ServiceSpec]:
    """A table from JSON: ``[{"name", "module" or "command", "port", "port_env", "role",
    "registers_as", "calls_internal"}]``."""
    try:
        specs = _TABLE.validate_json(path.read_bytes())
    except OSError as exc:
        raise ServicesFileError(f"cannot read {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors()
        )
        raise ServicesFileError(f"{path}: {problems}") from exc
    check_table(specs)
    return specs


def check_table(specs: Sequence[ServiceSpec]) -> None:
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ServicesFileError(f"service names must be unique: {', '.join(duplicates)}")
    if not specs:
        raise ServicesFileError("the service table is empty")
    for role in ("registry", "gateway", "auth"):
        if sum(s.role == role for s in specs) > 1:
            raise ServicesFileError(f"only one service may have the role {role!r}")
