"""Stock per SKU, reservations and their lines.

Revision ID: inventory_0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "inventory_0001"
down_revision = None
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


SKU_CODE = sa.String(64).with_variant(
    mysql.VARCHAR(64, charset="ascii", collation="ascii_bin"), "mysql", "mariadb"
)


def upgrade() -> None:
    op.create_table(
        "stock",
        sa.Column("sku_code", SKU_CODE, primary_key=True),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.CheckConstraint("quantity >= 0", name="ck_stock_quantity_not_negative"),
    )
    op.create_table(
        "reservations",
        sa.Column("order_number", sa.String(36), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("released_at", Timestamp, nullable=True),
    )
    op.create_table(
        "reservation_lines",
        sa.Column(
            "order_number",
            sa.String(36),
            sa.ForeignKey(
                "reservations.order_number",
                name="fk_reservation_lines_reservation",
                ondelete="CASCADE",
            ),
            primary_key=True,
        ),
        sa.Column("sku_code", SKU_CODE, primary_key=True),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reservation_lines")
    op.drop_table("reservations")
    op.drop_table("stock")
