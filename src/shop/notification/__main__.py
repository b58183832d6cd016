"""``python -m shop.notification`` serves notification-service."""

from __future__ import annotations

import sys

from shop.notification.app import SERVICE_NAME, build_app
from shop.notification.settings import NotificationSettings
from shop.platform.serve import main

if __name__ == "__main__":
    sys.exit(main(name=SERVICE_NAME, settings=NotificationSettings, build_app=build_app))
