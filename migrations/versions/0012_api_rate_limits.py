"""rate limits per API key

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04

Issue 24 (seed 002's rate_limit_tracker): every key gets a limit of requests per fixed
window, the [api] rate_limit default or its own (`api_keys.rate_limit_requests` and
`rate_limit_window_s`, both or neither). `api_rate_windows` holds one row per key, its
current window and the requests counted in it: authentication upserts it in the statement
that reads the key (escrow/ratelimit.py), so the limit holds across every API process on
one PostgreSQL. The table is UNLOGGED there: a row is rewritten on every request, and a
crash that forgets the counts only lets a key start its window afresh; no money depends on
it, and it skips the WAL write of each request.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
RATE_LIMIT_CHECK = (
    "(rate_limit_requests IS NULL AND rate_limit_window_s IS NULL) OR "
    "(rate_limit_requests > 0 AND rate_limit_window_s > 0)"
)


def upgrade() -> None:
    # SQLite cannot add a CHECK to a table: batch mode rebuilds api_keys (a few rows).
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit_requests", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("rate_limit_window_s", sa.Integer(), nullable=True))
        batch_op.create_check_constraint(op.f("ck_api_keys_rate_limit_valid"), RATE_LIMIT_CHECK)
    unlogged = ["UNLOGGED"] if op.get_bind().dialect.name == "postgresql" else []
    op.create_table(
        "api_rate_windows",
        sa.Column("api_key_id", ID, nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("request_count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"], ["api_keys.id"], name=op.f("fk_api_rate_windows_api_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("api_key_id", name=op.f("pk_api_rate_windows")),
        prefixes=unlogged,
    )


def downgrade() -> None:
    op.drop_table("api_rate_windows")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_api_keys_rate_limit_valid"), type_="check")
        batch_op.drop_column("rate_limit_window_s")
        batch_op.drop_column("rate_limit_requests")
