"""open escrows indexed by buyer and by expiry, terminal ones in neither

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

Revision 0001 indexed escrows on (status, expires_at). Every escrow stays in it for ever,
and the balances of an agent (the sum of the open escrows it funded) read every open escrow
of every buyer through it: with N escrows open across the marketplace a balance read N rows.
Two partial indexes hold only open escrows instead: by buyer for balances, and by expiry
(funded escrows that have one) for the expiry job. A settled escrow leaves both, so neither
grows with history, and a release writes one index entry fewer.

The queries that use them (escrow.service.balances, expire_due_escrows) state the statuses
as literals: a predicate on a bound parameter cannot prove a partial index's condition.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "status IN ('funded', 'expired')"
DUE = "status = 'funded' AND expires_at IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("escrows", schema=None) as batch_op:
        batch_op.drop_index("ix_escrows_status_expires_at")
        batch_op.create_index(
            "ix_escrows_open_by_buyer",
            ["buyer_agent_id", "asset"],
            postgresql_where=sa.text(OPEN),
            sqlite_where=sa.text(OPEN),
        )
        batch_op.create_index(
            "ix_escrows_due",
            ["expires_at", "id"],
            postgresql_where=sa.text(DUE),
            sqlite_where=sa.text(DUE),
        )


def downgrade() -> None:
    with op.batch_alter_table("escrows", schema=None) as batch_op:
        batch_op.drop_index("ix_escrows_due")
        batch_op.drop_index("ix_escrows_open_by_buyer")
        batch_op.create_index("ix_escrows_status_expires_at", ["status", "expires_at"])
