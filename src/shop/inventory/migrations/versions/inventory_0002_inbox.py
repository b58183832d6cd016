"""The inbox: product events already applied (a SKU becomes known once per event).

Revision ID: inventory_0002
Revises: inventory_0001
Create Date: 2025-06-01
"""

from __future__ import annotations

from alembic import op

from shop.platform.inbox import create_inbox_table

revision = "inventory_0002"
down_revision = "inventory_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_inbox_table(op)


def downgrade() -> None:
    op.drop_table("inbox")
