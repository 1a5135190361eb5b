"""deposits: uint256 amounts and the state of each deposit's credit

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24

A token's amounts are uint256 and its decimals its own: USDC on BNB Chain has 18, so a
10 USDC deposit there is 10^19 base units, past BIGINT, and every poll of that chain failed
on it. `deposits.amount` (and the new `dust_base_units`) become NUMERIC(78, 0) on
PostgreSQL and decimal text on SQLite, whose integer columns hold 64 bits (larger values
become floats). The ledger keeps USDC at one scale and deposits are converted into it.

`credit_state`, `credited_base_units` (ledger units standing for the deposit) and
`credit_note` say what happened to a deposit's credit: credited, held as dust, refused,
reversed, or reversed short by N after a deep reorg (models.chain.Deposit). Existing rows
take the state their `credited`/`reversed` flags and status imply; a credit that stood on
an orphaned deposit was a reversal that fell short of its whole amount.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UINT256 = sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite")
CREDIT_STATES = "'none', 'credited', 'dust', 'refused', 'reversed', 'reversal_short'"

_BACKFILL_STATE = """
UPDATE deposits SET
    credit_state = CASE
        WHEN reversed THEN 'reversed'
        WHEN status = 'orphaned' THEN 'reversal_short'
        ELSE 'credited' END,
    credited_base_units = CASE WHEN reversed THEN 0 ELSE amount END
WHERE credited
"""


def upgrade() -> None:
    with op.batch_alter_table("deposits", schema=None) as batch_op:
        batch_op.alter_column(
            "amount",
            existing_type=sa.BigInteger(),
            type_=UINT256,
            existing_nullable=False,
            postgresql_using="amount::numeric(78, 0)",
        )
        batch_op.add_column(
            sa.Column("credit_state", sa.String(length=16), server_default="none", nullable=False)
        )
        batch_op.add_column(
            sa.Column("credited_base_units", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("dust_base_units", UINT256, server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("credit_note", sa.String(length=200), nullable=True))
        batch_op.create_check_constraint(
            "credit_state_valid", sa.text(f"credit_state IN ({CREDIT_STATES})")
        )
        batch_op.create_check_constraint(
            "credit_amounts_valid",
            sa.text("credited_base_units >= 0 AND dust_base_units >= 0"),
        )
    op.execute(_BACKFILL_STATE)


def downgrade() -> None:
    # Amounts past BIGINT cannot go back: the downgrade fails on them rather than lose them.
    with op.batch_alter_table("deposits", schema=None) as batch_op:
        batch_op.drop_constraint("credit_amounts_valid", type_="check")
        batch_op.drop_constraint("credit_state_valid", type_="check")
        batch_op.drop_column("credit_note")
        batch_op.drop_column("dust_base_units")
        batch_op.drop_column("credited_base_units")
        batch_op.drop_column("credit_state")
        batch_op.alter_column(
            "amount",
            existing_type=UINT256,
            type_=sa.BigInteger(),
            existing_nullable=False,
            postgresql_using="amount::bigint",
        )
