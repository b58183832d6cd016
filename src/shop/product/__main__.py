"""``python -m shop.product`` serves product-service."""

from __future__ import annotations

from shop.platform.serve import bind_socket, configure_logging, serve
from shop.platform.settings import PlatformSettings
from shop.product.app import SERVICE_NAME, build_app
from shop.product.settings import ProductSettings

__all__ = ["main"]


def main() -> None:
    platform = PlatformSettings()
    settings = ProductSettings()
    configure_logging(platform.log_level)
    sock = bind_socket(settings.host, settings.port)
    app = build_app(platform=platform, settings=settings)
    app.state.bound_port = sock.getsockname()[1]
    serve(app, name=SERVICE_NAME, sock=sock, log_level=platform.log_level)


if __name__ == "__main__":
    main()
