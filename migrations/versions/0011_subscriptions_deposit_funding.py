"""recurring charges (subscriptions); escrows funded by one named deposit

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04

What the seed marketplaces expect and escrowd lacked (issue 24):
- `subscriptions` and `subscription_charges`: a buyer's standing authorization to be charged
  every period, and one row per charged period. UNIQUE (subscription_id, period_index) is
  what keeps a period from being charged twice by two runners or two daemons; the charge's
  ledger transfers carry per-period idempotency keys as a second guard. The scheduler
  reads due subscriptions through a partial index of the active ones.
- `escrows.deposit_id` and `escrows.depositor_address`: an escrow funded from one named
  deposit. A partial UNIQUE index on deposit_id lets a deposit fund one escrow at most;
  being partial, an escrow funded from a balance (all of them until now) writes no entry
  in it, so the fund path does the same work as before.
- The ledger's transfer codes gain `subscription_charge`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from escrowd.models import base as models_base

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
WHEN = models_base.UTCDateTime(timezone=True)
ACTIVE = "status = 'active'"
FUNDED_BY_DEPOSIT = "deposit_id IS NOT NULL"

_CODES = (
    "deposit",
    "deposit_reversal",
    "escrow_fund",
    "escrow_release",
    "fee",
    "refund",
    "payout_hold",
    "payout",
    "payout_reversal",
    "adjustment",
)
_NEW_CODES = (*_CODES, "subscription_charge")
_CODE_CHECK = "ck_ledger_transfers_code_valid"


def _replace_code_check(codes: Sequence[str]) -> None:
    if op.get_bind().dialect.name == "postgresql":
        # The compact form revision 0004 gave this check (one array constant).
        condition = f"code::text = ANY ('{{{','.join(codes)}}}'::text[])"
        op.execute(
            f"ALTER TABLE ledger_transfers DROP CONSTRAINT {_CODE_CHECK}, "
            f"ADD CONSTRAINT {_CODE_CHECK} CHECK ({condition})"
        )
        return
    with op.batch_alter_table("ledger_transfers", schema=None) as batch_op:
        batch_op.drop_constraint(op.f(_CODE_CHECK), type_="check")
        batch_op.create_check_constraint(
            "code_valid", f"code IN ({', '.join(repr(code) for code in codes)})"
        )


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("id", ID, nullable=False),
        sa.Column("external_id", sa.String(length=128), nullable=False),
        sa.Column("buyer_agent_id", ID, nullable=False),
        sa.Column("worker_agent_id", ID, nullable=True),
        sa.Column("asset", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("fee_bps", sa.Integer(), nullable=False),
        sa.Column("interval", sa.String(length=8), nullable=False),
        sa.Column("interval_count", sa.Integer(), nullable=False),
        sa.Column("anchor_at", WHEN, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("next_period", sa.Integer(), nullable=False),
        sa.Column("next_charge_at", WHEN, nullable=False),
        sa.Column("paused_at", WHEN, nullable=True),
        sa.Column("canceled_at", WHEN, nullable=True),
        sa.Column("canceled_by", sa.String(length=16), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_subscriptions_amount_positive")),
        sa.CheckConstraint(
            "fee_bps >= 0 AND fee_bps <= 10000", name=op.f("ck_subscriptions_fee_bps_range")
        ),
        sa.CheckConstraint(
            "status IN ('active', 'paused', 'canceled')",
            name=op.f("ck_subscriptions_status_valid"),
        ),
        sa.CheckConstraint(
            "interval IN ('day', 'week', 'month')", name=op.f("ck_subscriptions_interval_valid")
        ),
        sa.CheckConstraint(
            "interval_count >= 1 AND interval_count <= 365",
            name=op.f("ck_subscriptions_interval_count_range"),
        ),
        sa.CheckConstraint(
            "next_period >= 0", name=op.f("ck_subscriptions_next_period_nonnegative")
        ),
        sa.CheckConstraint(
            "worker_agent_id IS NULL OR worker_agent_id <> buyer_agent_id",
            name=op.f("ck_subscriptions_distinct_parties"),
        ),
        sa.ForeignKeyConstraint(
            ["buyer_agent_id"], ["agents.id"], name=op.f("fk_subscriptions_buyer_agent_id_agents")
        ),
        sa.ForeignKeyConstraint(
            ["worker_agent_id"],
            ["agents.id"],
            name=op.f("fk_subscriptions_worker_agent_id_agents"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
        sa.UniqueConstraint("external_id", name=op.f("uq_subscriptions_external_id")),
    )
    with op.batch_alter_table("subscriptions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_subscriptions_due",
            ["next_charge_at", "id"],
            postgresql_where=sa.text(ACTIVE),
            sqlite_where=sa.text(ACTIVE),
        )
        batch_op.create_index("ix_subscriptions_buyer_id", ["buyer_agent_id", "id"])

    op.create_table(
        "subscription_charges",
        sa.Column("id", ID, nullable=False),
        sa.Column("subscription_id", ID, nullable=False),
        sa.Column("period_index", sa.Integer(), nullable=False),
        sa.Column("period_start", WHEN, nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("payee_amount", sa.BigInteger(), nullable=True),
        sa.Column("fee_amount", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("charged_at", WHEN, nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_subscription_charges_amount_positive")),
        sa.CheckConstraint(
            "period_index >= 0", name=op.f("ck_subscription_charges_period_index_nonnegative")
        ),
        sa.CheckConstraint(
            "status IN ('succeeded', 'failed')",
            name=op.f("ck_subscription_charges_status_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_subscription_charges_subscription_id_subscriptions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscription_charges")),
        sa.UniqueConstraint(
            "subscription_id",
            "period_index",
            name=op.f("uq_subscription_charges_subscription_id_period_index"),
        ),
    )

    # A nullable column with a reference is a plain ADD COLUMN on both databases (SQLite
    # takes the reference inline), so the escrows table and its partial indexes stay as
    # they are rather than being copied.
    if op.get_bind().dialect.name == "postgresql":
        op.add_column("escrows", sa.Column("deposit_id", ID, nullable=True))
        op.create_foreign_key(
            op.f("fk_escrows_deposit_id_deposits"), "escrows", "deposits", ["deposit_id"], ["id"]
        )
    else:
        op.execute(
            "ALTER TABLE escrows ADD COLUMN deposit_id INTEGER "
            "CONSTRAINT fk_escrows_deposit_id_deposits REFERENCES deposits (id)"
        )
    op.add_column("escrows", sa.Column("depositor_address", sa.String(length=64), nullable=True))
    op.create_index(
        "uq_escrows_deposit_id",
        "escrows",
        ["deposit_id"],
        unique=True,
        postgresql_where=sa.text(FUNDED_BY_DEPOSIT),
        sqlite_where=sa.text(FUNDED_BY_DEPOSIT),
    )
    _replace_code_check(_NEW_CODES)


def downgrade() -> None:
    _replace_code_check(_CODES)
    op.drop_index("uq_escrows_deposit_id", table_name="escrows")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("fk_escrows_deposit_id_deposits", "escrows", type_="foreignkey")
        op.drop_column("escrows", "depositor_address")
        op.drop_column("escrows", "deposit_id")
    else:
        # SQLite will not drop a column that a reference constrains: copy the table.
        with op.batch_alter_table("escrows", schema=None) as batch_op:
            batch_op.drop_column("depositor_address")
            batch_op.drop_column("deposit_id")
    op.drop_table("subscription_charges")
    op.drop_index("ix_subscriptions_buyer_id", table_name="subscriptions")
    op.drop_index("ix_subscriptions_due", table_name="subscriptions")
    op.drop_table("subscriptions")
