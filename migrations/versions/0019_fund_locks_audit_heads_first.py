"""a fund takes its audit-heads lock before it numbers its audit rows

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-04

An audit checkpoint (escrow/audit.write_checkpoint) anchors the stream heads at a point where
no writer is in flight: it locks audit_heads against writers, and records the highest audit
row id with the digest; `audit verify` recomputes the heads from the rows up to that id.
Every writer locks audit_heads before it inserts audit rows (their ids come from a sequence
at insert), except escrowd_fund_escrow, which inserted its two rows first and its new stream's
head after. A fund between those two statements when a checkpoint began held no lock the
checkpoint waited for: its rows took ids below the checkpoint's highest, committed after it,
and `audit verify` then reported the checkpoint's digest as not matching (a false alarm of
tampering). The head is now inserted first; the rows and hashes are the same.
"""

from collections.abc import Sequence

from alembic import op

from escrowd.migrations import earlier

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HEAD = "    INSERT INTO audit_heads (stream, seq, row_hash) VALUES (v_stream, 2, v_escrow_hash);\n"
_ROWS = (
    "    INSERT INTO audit_log (stream, seq, actor, action, asset, amount, details, created_at,\n"
)
_HEAD_FIRST = (
    "    -- The head first: its lock is what an audit checkpoint waits for (revision 0019).\n"
    + _HEAD
)


def _fund_of_0016() -> str:
    written: str = earlier.revision("0016_escrowed_on_the_buyer_account.py").fund_function()
    return written


def fund_function() -> str:
    """escrowd_fund_escrow as this revision writes it (revision 0021 edits it again)."""
    fund = _fund_of_0016()
    if fund.count(_HEAD) != 1 or fund.count(_ROWS) != 1:
        raise RuntimeError("escrowd_fund_escrow is not as revision 0016 wrote it")
    return fund.replace(_HEAD, "").replace(_ROWS, _HEAD_FIRST + _ROWS)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(fund_function())


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_fund_of_0016())
