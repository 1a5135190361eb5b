"""rate-limit windows remember their last grant

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04

Issue 24: counting every request in the key's `api_rate_windows` row made each read a
write, and the requests of one key queued on that row. An API process now takes several
requests of the window at once and hands them out itself (escrow/ratelimit.py). The
statement that takes them caps the grant at what is left of the limit; `granted` is what
that last claim got, so the caller learns it from the row the upsert returns (an upsert
cannot return the row as it was before).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_rate_windows", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("granted", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("api_rate_windows", schema=None) as batch_op:
        batch_op.drop_column("granted")
