"""Alembic environment of the notification service: the platform runs it on its connection."""

from shop.platform.db import run_migrations_env

run_migrations_env()
