"""payouts that wait for the float, need attention or were cancelled; step backoff

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25

One payout's unexpected error used to abort its chain's whole tick, on every tick. Now
such a payout is parked in `needs_attention` (its hold kept, `attention_from` saying where
`escrowd payouts retry` resumes it), an operator may cancel a payout once nothing signed
for it can land (`cancelled`, hold reversed), and a payout the hot wallet cannot cover
waits in `waiting_funds` instead of burning gas on a revert. `status_reason` says why.
A step that fails for RPC or database trouble backs off: `step_errors`, `failing_since`,
`retry_at`, and `stall_reported` so the one `payout_stalled` alert is logged once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from escrowd.models import base as models_base

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = ("requested", "signed", "broadcast", "confirmed", "failed")
NEW_STATUSES = (*OLD_STATUSES, "waiting_funds", "needs_attention", "cancelled")
CHECK = "ck_payouts_status_valid"


def _status_check(statuses: Sequence[str]) -> str:
    return "status IN ({})".format(", ".join(f"'{status}'" for status in statuses))


def upgrade() -> None:
    # SQLite cannot alter a CHECK: batch mode rebuilds the table with the new one.
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.drop_constraint(op.f(CHECK), type_="check")
        batch_op.create_check_constraint(op.f(CHECK), _status_check(NEW_STATUSES))
        batch_op.add_column(sa.Column("status_reason", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("attention_from", sa.String(length=16), nullable=True))
        batch_op.add_column(
            sa.Column("step_errors", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.add_column(
            sa.Column("failing_since", models_base.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("retry_at", models_base.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("stall_reported", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.drop_column("stall_reported")
        batch_op.drop_column("retry_at")
        batch_op.drop_column("failing_since")
        batch_op.drop_column("step_errors")
        batch_op.drop_column("attention_from")
        batch_op.drop_column("status_reason")
        batch_op.drop_constraint(op.f(CHECK), type_="check")
        batch_op.create_check_constraint(op.f(CHECK), _status_check(OLD_STATUSES))
