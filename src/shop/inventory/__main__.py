"""``python -m shop.inventory`` serves inventory-service."""

from __future__ import annotations

from shop.inventory.app import SERVICE_NAME, build_app
from shop.inventory.settings import InventorySettings
from shop.platform.serve import bind_socket, configure_logging, serve
from shop.platform.settings import PlatformSettings

__all__ = ["main"]


def main() -> None:
    platform = PlatformSettings()
    settings = InventorySettings()
    configure_logging(platform.log_level)
    sock = bind_socket(settings.host, settings.port)
    app = build_app(platform=platform, settings=settings)
    app.state.bound_port = sock.getsockname()[1]
    serve(app, name=SERVICE_NAME, sock=sock, log_level=platform.log_level)


if __name__ == "__main__":
    main()
