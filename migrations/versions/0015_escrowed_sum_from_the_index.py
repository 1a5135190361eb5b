"""a buyer's escrowed sum from the index alone

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04

Issue 19: GET /v1/agents/{id}/balances sums the buyer's open escrows. The partial index
ix_escrows_open_by_buyer found them, and each was then read from its table page: for a
buyer with 313 open escrows, 309 pages and 0.67 of the statement's 0.76 ms. With the
amount in the index (INCLUDE, PostgreSQL only) the sum is an index-only scan: 5 pages,
0.2 ms. SQLite keeps the index as it was.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "status IN ('funded', 'expired')"


def _recreate(include: list[str]) -> None:
    op.drop_index("ix_escrows_open_by_buyer", table_name="escrows")
    op.create_index(
        "ix_escrows_open_by_buyer",
        "escrows",
        ["buyer_agent_id", "asset"],
        postgresql_include=include,
        postgresql_where=sa.text(OPEN),
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _recreate(["amount"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _recreate([])
