"""The catalogue's prices as a read model fed by ``product.*`` events, and its inbox.

Revision ID: order_0003
Revises: order_0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shop.platform.inbox import create_inbox_table

revision = "order_0003"
down_revision = "order_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalogue_prices",
        sa.Column("product_id", sa.String(64), primary_key=True),
        sa.Column("sku_code", sa.String(64), nullable=True),
        sa.Column("price_cents", sa.BigInteger, nullable=True),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_catalogue_prices_sku", "catalogue_prices", ["sku_code"])
    create_inbox_table(op)


def downgrade() -> None:
    op.drop_table("inbox")
    op.drop_index("ix_catalogue_prices_sku", table_name="catalogue_prices")
    op.drop_table("catalogue_prices")
