"""Alembic history of the notification service."""
