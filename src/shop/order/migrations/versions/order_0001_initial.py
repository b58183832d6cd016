"""Orders, their lines, Idempotency-Keys, and the outbox.

Revision ID: order_0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from shop.platform.outbox import create_outbox_tables

revision = "order_0001"
down_revision = None
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("order_number", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("buyer_email", sa.String(320), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("total_cents", sa.BigInteger, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("cancelled_at", Timestamp, nullable=True),
    )
    op.create_index("ix_orders_user_newest", "orders", ["user_id", "created_at", "order_number"])
    op.create_table(
        "order_lines",
        sa.Column(
            "order_number",
            sa.String(36),
            sa.ForeignKey("orders.order_number", name="fk_order_lines_order", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("line_no", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sku_code", sa.String(64), nullable=False),
        sa.Column("quantity", sa.Integer, nullable=False),
        sa.Column("unit_price_cents", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("idempotency_key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column(
            "response_body",
            sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb"),
            nullable=True,
        ),
        sa.Column("order_number", sa.String(36), nullable=True),
    )
    create_outbox_tables(op)


def downgrade() -> None:
    op.drop_table("shop_leases")
    op.drop_table("outbox")
    op.drop_table("idempotency_keys")
    op.drop_table("order_lines")
    op.drop_index("ix_orders_user_newest", table_name="orders")
    op.drop_table("orders")
