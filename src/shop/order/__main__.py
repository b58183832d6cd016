"""``python -m shop.order`` serves order-service."""

from __future__ import annotations

from shop.order.app import SERVICE_NAME, build_app
from shop.order.settings import OrderSettings
from shop.platform.serve import bind_socket, configure_logging, serve
from shop.platform.settings import PlatformSettings

__all__ = ["main"]


def main() -> None:
    platform = PlatformSettings()
    settings = OrderSettings()
    configure_logging(platform.log_level)
    sock = bind_socket(settings.host, settings.port)
    app = build_app(platform=platform, settings=settings)
    app.state.bound_port = sock.getsockname()[1]
    serve(app, name=SERVICE_NAME, sock=sock, log_level=platform.log_level)


if __name__ == "__main__":
    main()
