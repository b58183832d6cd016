"""Alembic environment of the product service: the platform runs it on the connection it opened."""

from shop.platform.db import run_migrations_env

run_migrations_env()
