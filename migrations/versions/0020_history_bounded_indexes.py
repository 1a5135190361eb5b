"""indexes that keep reads of live rows off the history

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-04

Reads of live rows scanned every row ever written, so their cost grew with history.
Measured on PostgreSQL at 100,000 payouts, 150,000 deposits and escrows and 650,000 audit
rows, unanalyzed (pages read, before -> after):

- payouts (chain, source_address, updated_at): the Solana poller's last outflow of 500
  wallets, 2,859 -> 1,663 (11.2 -> 1.4 ms); create_sweep's earlier sweeps, 2,859 -> 4;
- deposits (status, id): GET /v1/deposits?status=pending, 3,484 -> 4 (16.0 -> 0.03 ms),
  and the oldest pending deposit in /metrics, 3,484 -> 2;
- escrows (status) of open escrows: their count at each /metrics scrape, 2,941 -> 2;
- deposits (agent_id) pending, payouts (agent_id) open and not sweeps: balances, 143 -> 13;
- escrows (buyer_agent_id, id), (worker_agent_id, id): GET /v1/audit?agent=, with its
  streams read one by one, 4,690 -> 1,385 (930 -> 2.2 ms);
- payouts (chain, updated_at) of failed sweeps: the Solana sweeps' backoff reads the sweeps
  of addresses whose sweep failed lately, not every sweep of the chain: 3,010 -> 2 pages
  (12.4 -> 0.03 ms, and 8,333 rows no longer handed to Python) with no recent failure.

A partial index serves a query only when its condition appears in the query as written:
the queries state these conditions as the same SQL text.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING_DEPOSIT = "status = 'pending'"
OPEN_ESCROW = "status IN ('funded', 'expired')"
HELD_BY_PAYOUT = "reason <> 'sweep' AND status NOT IN ('confirmed', 'failed', 'cancelled')"
FAILED_SWEEP = "status = 'failed' AND reason = 'sweep'"


def upgrade() -> None:
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_payouts_chain_source_address_updated_at",
            ["chain", "source_address", "updated_at"],
        )
        batch_op.create_index(
            "ix_payouts_held_by_agent",
            ["agent_id"],
            postgresql_where=sa.text(HELD_BY_PAYOUT),
            sqlite_where=sa.text(HELD_BY_PAYOUT),
        )
        batch_op.create_index(
            "ix_payouts_failed_sweeps",
            ["chain", "updated_at"],
            postgresql_where=sa.text(FAILED_SWEEP),
            sqlite_where=sa.text(FAILED_SWEEP),
        )
    with op.batch_alter_table("deposits", schema=None) as batch_op:
        batch_op.create_index("ix_deposits_status_id", ["status", "id"])
        batch_op.create_index(
            "ix_deposits_pending_by_agent",
            ["agent_id"],
            postgresql_where=sa.text(PENDING_DEPOSIT),
            sqlite_where=sa.text(PENDING_DEPOSIT),
        )
    with op.batch_alter_table("escrows", schema=None) as batch_op:
        batch_op.create_index(
            "ix_escrows_open",
            ["status"],
            postgresql_where=sa.text(OPEN_ESCROW),
            sqlite_where=sa.text(OPEN_ESCROW),
        )
        batch_op.create_index("ix_escrows_buyer_agent_id_id", ["buyer_agent_id", "id"])
        batch_op.create_index("ix_escrows_worker_agent_id_id", ["worker_agent_id", "id"])


def downgrade() -> None:
    with op.batch_alter_table("escrows", schema=None) as batch_op:
        batch_op.drop_index("ix_escrows_worker_agent_id_id")
        batch_op.drop_index("ix_escrows_buyer_agent_id_id")
        batch_op.drop_index("ix_escrows_open")
    with op.batch_alter_table("deposits", schema=None) as batch_op:
        batch_op.drop_index("ix_deposits_pending_by_agent")
        batch_op.drop_index("ix_deposits_status_id")
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.drop_index("ix_payouts_failed_sweeps")
        batch_op.drop_index("ix_payouts_held_by_agent")
        batch_op.drop_index("ix_payouts_chain_source_address_updated_at")
