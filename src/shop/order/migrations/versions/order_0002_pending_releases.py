"""Pending releases: reservations to give back to the inventory, durably.

Revision ID: order_0002
Revises: order_0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "order_0002"
down_revision = "order_0001"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "pending_releases",
        sa.Column("order_number", sa.String(36), primary_key=True),
        sa.Column("due_at", Timestamp, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.String(500), nullable=True),
    )
    op.create_index("ix_pending_releases_due", "pending_releases", ["due_at"])


def downgrade() -> None:
    op.drop_index("ix_pending_releases_due", table_name="pending_releases")
    op.drop_table("pending_releases")
