"""``python -m shop.gateway``: serve the gateway on GATEWAY_PORT (8765) and register it."""

from __future__ import annotations

from shop.gateway.app import NAME, build_app
from shop.gateway.settings import GatewaySettings
from shop.platform.serve import bind_socket, configure_logging, serve
from shop.platform.settings import PlatformSettings


def main() -> None:
    platform = PlatformSettings()
    settings = GatewaySettings()
    configure_logging(platform.log_level)
    sock = bind_socket(settings.host, settings.port)
    app = build_app(platform=platform, settings=settings)
    app.state.bound_port = sock.getsockname()[1]
    serve(app, name=NAME, sock=sock, log_level=platform.log_level, proxy_headers=False)


if __name__ == "__main__":
    main()
