"""what a buyer has in open escrows, kept on its available account

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04

Issue 19: GET /v1/agents/{id}/balances summed the buyer's open escrows at every read, so a
read cost grew with them: at 313 open escrows the sum was 0.49 of the statement's 0.76 ms,
and the HTTP benchmark's balances rate fell round after round as each round's funds added
~300 per buyer. `ledger_accounts.escrowed` holds that sum on the buyer's available account
(per asset), written in the same statements that already lock the row:

- a fund debits the account and adds the amount in one UPDATE;
- a settlement (release, refund, resolution) takes the amount off and, in the same UPDATE,
  credits any refund. A release now locks the buyer's row too, so the buyer's and the
  worker's rows are locked lowest agent id first, as resolutions already did: two
  settlements between the same agents in opposite roles cannot deadlock.

Agents' account rows are now updated by every fund and settlement of their escrows, 3 to 4
times per operation in all: on PostgreSQL the table keeps 30 % of each page free
(fillfactor 70) so that the new version of a row goes on its page (a HOT update, no new
index entries). With full pages 32 % of its updates in the HTTP benchmark were not HOT and
each left entries in both indexes behind; with fillfactor 70, 2 %. (Pages written before
the upgrade stay full until rewritten.)

Expiry (funded -> expired) leaves the sum alone: both states are open. Nothing reads
ix_escrows_open_by_buyer any more, so it goes, and a fund writes one index entry fewer. `escrowd ledger
check` compares the column with the escrows (check `escrowed_totals`). The Python path
(SQLite, and expiry's refund on PostgreSQL) keeps it in escrow/service.py.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from escrowd.migrations import earlier

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "('funded', 'expired')"
_0004 = "0004_escrow_fewer_statements.py"

# Each open escrow's amount on its buyer's available account for the escrow's asset.
_BACKFILL = {
    "postgresql": """
UPDATE ledger_accounts a SET escrowed = s.total
FROM (SELECT buyer_agent_id, asset, sum(amount) AS total FROM escrows
      WHERE status IN ('funded', 'expired') GROUP BY buyer_agent_id, asset) s
WHERE a.kind = 'agent_available' AND a.owner = s.buyer_agent_id::text AND a.asset = s.asset
""",
    "sqlite": """
UPDATE ledger_accounts SET escrowed = (
    SELECT coalesce(sum(e.amount), 0) FROM escrows e
    WHERE e.status IN ('funded', 'expired') AND CAST(e.buyer_agent_id AS TEXT) = ledger_accounts.owner
      AND e.asset = ledger_accounts.asset)
WHERE kind = 'agent_available'
""",
}

# The settlement's buyer leg: the escrowed amount off the buyer's account and the refund
# (if any) on it. The account exists: the fund debited it.
_RELEASE_HOLD = """
CREATE FUNCTION escrowd_release_hold(
    p_agent_id bigint, p_asset text, p_amount bigint, p_refund bigint
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    UPDATE ledger_accounts a SET escrowed = a.escrowed - p_amount,
        credits_posted = a.credits_posted + p_refund
    WHERE a.kind = 'agent_available' AND a.owner = p_agent_id::text AND a.asset = p_asset
    RETURNING a.id INTO v_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % has no % account holding its escrow', p_agent_id, p_asset;
    END IF;
    RETURN v_id;
END;
$$;
"""

# (what revision 0004 wrote, what this revision writes instead) in its two functions.
_FUND_EDITS = (
    (
        "UPDATE ledger_accounts a SET debits_posted = a.debits_posted + p_amount\n",
        "UPDATE ledger_accounts a SET debits_posted = a.debits_posted + p_amount,\n"
        "        escrowed = a.escrowed + p_amount\n",
    ),
    (
        "UPDATE ledger_accounts a SET debits_posted = a.debits_posted - p_amount\n",
        "UPDATE ledger_accounts a SET debits_posted = a.debits_posted - p_amount,\n"
        "                escrowed = a.escrowed - p_amount\n",
    ),
)
_SETTLE_EDITS = (
    (
        """    IF e.refund_amount > 0 AND e.buyer_agent_id < e.worker_agent_id THEN
        v_buyer_account := escrowd_credit_agent(e.buyer_agent_id, e.asset, e.refund_amount,
            p_now);
    END IF;
""",
        """    IF e.buyer_agent_id < e.worker_agent_id OR e.worker_amount = 0 THEN
        v_buyer_account := escrowd_release_hold(e.buyer_agent_id, e.asset, e.amount,
            e.refund_amount);
    END IF;
""",
    ),
    (
        """    IF e.refund_amount > 0 THEN
        IF v_buyer_account IS NULL THEN
            v_buyer_account := escrowd_credit_agent(e.buyer_agent_id, e.asset,
                e.refund_amount, p_now);
        END IF;
""",
        """    IF v_buyer_account IS NULL THEN
        v_buyer_account := escrowd_release_hold(e.buyer_agent_id, e.asset, e.amount,
            e.refund_amount);
    END IF;
    IF e.refund_amount > 0 THEN
""",
    ),
    (
        "-- Legs in the order worker, fee, refund. When a resolution credits both agents, the\n"
        "    -- lower agent id is credited first, so two resolutions between the same two "
        "agents in\n"
        "    -- opposite roles lock their accounts in the same order.\n",
        "-- Legs in the order worker, fee, refund. The buyer's account gives up the escrowed\n"
        "    -- amount (and takes any refund) before or after the worker's credit, lower agent\n"
        "    -- id first, so two settlements between the same two agents in opposite roles\n"
        "    -- lock their accounts in the same order.\n",
    ),
)


def _edited(text: str, edits: tuple[tuple[str, str], ...]) -> str:
    for old, new in edits:
        if text.count(old) != 1:
            raise RuntimeError(f"expected one {old!r} in the function to change")
        text = text.replace(old, new)
    return text


def fund_function() -> str:
    """escrowd_fund_escrow as this revision writes it (revision 0019 edits it again)."""
    return _edited(earlier.function(_0004, "escrowd_fund_escrow"), _FUND_EDITS)


def settle_function() -> str:
    """escrowd_settle_escrow as this revision writes it (revision 0021 edits it again)."""
    return _edited(earlier.function(_0004, "escrowd_settle_escrow"), _SETTLE_EDITS)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.execute(
        "ALTER TABLE ledger_accounts ADD COLUMN escrowed BIGINT DEFAULT 0 NOT NULL "
        "CONSTRAINT ck_ledger_accounts_escrowed_nonnegative CHECK (escrowed >= 0)"
    )
    op.execute(_BACKFILL[dialect])
    op.drop_index("ix_escrows_open_by_buyer", table_name="escrows")
    if dialect == "postgresql":
        op.execute("ALTER TABLE ledger_accounts SET (fillfactor = 70)")
        op.execute(_RELEASE_HOLD)
        op.execute(fund_function())
        op.execute(settle_function())


def downgrade() -> None:
    op.create_index(
        "ix_escrows_open_by_buyer",
        "escrows",
        ["buyer_agent_id", "asset"],
        postgresql_include=["amount"],
        postgresql_where=sa.text(f"status IN {OPEN}"),
        sqlite_where=sa.text(f"status IN {OPEN}"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(earlier.function(_0004, "escrowd_fund_escrow"))
        op.execute(earlier.function(_0004, "escrowd_settle_escrow"))
        op.execute("DROP FUNCTION escrowd_release_hold(bigint, text, bigint, bigint)")
        op.execute("ALTER TABLE ledger_accounts RESET (fillfactor)")
    op.drop_column("ledger_accounts", "escrowed")
