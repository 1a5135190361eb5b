"""the webhook outbox indexed by what is left to fan out

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04

Issue 19: the jobs process's fan-out asks for the oldest events not yet fanned out. Revision
0001 indexed the flag itself, which the query (ordered by id, limited) did not use: it walked
the primary key from the first event ever written past every event already fanned out. With
88,000 events behind it each poll read 75,000 pages (35-39 ms), and while escrow operations
kept the outbox busy that was a third of PostgreSQL's CPU per operation, growing with
history. A partial index of the ids still to fan out holds only the outbox's backlog: an
event leaves it when it is flagged.

The query states the condition as each database writes it (NOT fanned_out on PostgreSQL,
fanned_out = 0 on SQLite): a partial index is used only for a condition that matches its own.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING_PG = "NOT fanned_out"
PENDING_SQLITE = "fanned_out = 0"


def upgrade() -> None:
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_events_fanned_out")
        batch_op.create_index(
            "ix_webhook_events_to_fan_out",
            ["id"],
            postgresql_where=sa.text(PENDING_PG),
            sqlite_where=sa.text(PENDING_SQLITE),
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_events_to_fan_out")
        batch_op.create_index("ix_webhook_events_fanned_out", ["fanned_out"])
