"""``python -m shop.gateway``: serve the gateway on GATEWAY_PORT (8765) and register it."""

from __future__ import annotations

from shop.gateway.app import NAME, build_app
from shop.gateway.settings import GatewaySettings
from shop.platform.serve import configure_logging, run
from shop.platform.settings import PlatformSettings


def main() -> None:
    platform, settings = PlatformSettings(), GatewaySettings()
    configure_logging(platform.log_level)
    app = build_app(platform=platform, settings=settings)
    run(
        app,
        name=NAME,
        host=settings.host,
        port=settings.port,
        log_level=platform.log_level,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
