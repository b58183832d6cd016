"""``python -m shop.gateway``: serve the gateway on GATEWAY_PORT (8765) and register it."""

from __future__ import annotations

import sys

from shop.gateway.app import NAME, build_app
from shop.gateway.settings import GatewaySettings
from shop.platform.serve import main

if __name__ == "__main__":
    # At the edge, X-Forwarded-For comes from the caller: it must not become the client address.
    sys.exit(
        main(
            name=NAME,
            settings=GatewaySettings,
            build_app=build_app,
            proxy_headers=False,
            server_limits=GatewaySettings.server_limits,
        )
    )
