"""chain_cursors.account_state: the account state a per-address Solana cursor was verified at

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Per-address Solana polling called getSignaturesForAddress twice per deposit address on
every poll (998 calls per poll at 499 addresses). It now reads every watched account's
state with getMultipleAccounts (100 accounts per call) and pages an account's signatures
only when its state differs from the one stored here, written in the same transaction as
the account's signature cursor once its history up to that state is recorded. A restart
keeps the saving: without this column the first poll would page every account again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("chain_cursors", schema=None) as batch_op:
        batch_op.add_column(sa.Column("account_state", sa.String(length=120), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("chain_cursors", schema=None) as batch_op:
        batch_op.drop_column("account_state")
