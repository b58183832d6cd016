"""The catalogue (products) and the outbox of its events.

Revision ID: product_0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from shop.platform.outbox import create_outbox_tables

revision = "product_0001"
down_revision = None
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# Exact on MySQL; text on SQLite, whose NUMERIC affinity would store floats.
Money = sa.Numeric(12, 2).with_variant(sa.String(16), "sqlite")
BinaryText = sa.Text().with_variant(mysql.MEDIUMTEXT(collation="utf8mb4_bin"), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("id", sa.String(24), primary_key=True),
        sa.Column(
            "sku_code",
            sa.String(64).with_variant(
                mysql.VARCHAR(64, charset="ascii", collation="ascii_bin"), "mysql", "mariadb"
            ),
            nullable=False,
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("price", Money, nullable=False),
        sa.Column("category", sa.String(100), nullable=False),
        sa.Column(
            "category_key",
            sa.String(300).with_variant(
                mysql.VARCHAR(300, collation="utf8mb4_bin"), "mysql", "mariadb"
            ),
            nullable=False,
        ),
        sa.Column("search_text", BinaryText, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
    )
    op.create_index("uq_products_sku_code", "products", ["sku_code"], unique=True)
    op.create_index("ix_products_created", "products", ["created_at", "id"])
    op.create_index("ix_products_category", "products", ["category_key", "created_at", "id"])
    create_outbox_tables(op)


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("products")
