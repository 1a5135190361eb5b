"""escrow events without the internal escrow id; payouts indexed by agent

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

Webhook API version 2026-12-03 names everything by the ids the HTTP API shows: an escrow
by its job id, agents by the marketplace's ids. escrow.* events carried ``escrow_id``, a
row id no API response shows; escrowd_escrow_event (PostgreSQL's copy of
escrow/service._event_data, revision 0003) now writes the payload without it.

GET /v1/withdrawals?agent= lists an agent's payouts in id order: the index on
(agent_id, id) makes that one range read instead of a scan of every payout.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EVENT_HEAD = """
CREATE OR REPLACE FUNCTION escrowd_escrow_event(
    p_type text, p_api_version text, e escrows, p_buyer text, p_worker text
) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '{"api_version":' || escrowd_json_text(p_api_version)
        || ',"data":{"amount_base_units":"' || e.amount::text
        || '","asset":' || escrowd_json_text(e.asset)
        || ',"buyer":' || escrowd_json_text(p_buyer)
"""
_EVENT_TAIL = """
        || ',"fee_amount_base_units":' || coalesce('"' || e.fee_amount::text || '"', 'null')
        || ',"fee_bps":' || e.fee_bps::text
        || ',"job_id":' || escrowd_json_text(e.job_id)
        || ',"refund_amount_base_units":'
        || coalesce('"' || e.refund_amount::text || '"', 'null')
        || ',"status":' || escrowd_json_text(e.status)
        || ',"worker":' || escrowd_json_text(p_worker)
        || ',"worker_amount_base_units":'
        || coalesce('"' || e.worker_amount::text || '"', 'null')
        || '},"type":' || escrowd_json_text(p_type) || '}'
$$;
"""
# Keys are in canonical (sorted) order: escrow_id sat between buyer and fee_amount_base_units.
_EVENT_WITH_ESCROW_ID = _EVENT_HEAD + "        || ',\"escrow_id\":' || e.id::text" + _EVENT_TAIL


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_EVENT_HEAD + _EVENT_TAIL)
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.create_index("ix_payouts_agent_id_id", ["agent_id", "id"])


def downgrade() -> None:
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.drop_index("ix_payouts_agent_id_id")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_EVENT_WITH_ESCROW_ID)
