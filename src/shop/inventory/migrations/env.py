"""Alembic environment of the inventory service, run by the platform on its connection."""

from shop.platform.db import run_migrations_env

run_migrations_env()
