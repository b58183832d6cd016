"""Idempotency-Key claims name the process that holds them (``owner``), so a claim whose
process died is taken over as soon as that process's lease lapses (docs/order.md).

Revision ID: order_0004
Revises: order_0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "order_0004"
down_revision = "order_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Claims written before have none: they are taken over once stale, as they were.
    op.add_column("idempotency_keys", sa.Column("owner", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("owner")
