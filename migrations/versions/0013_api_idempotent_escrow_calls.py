"""idempotency claim and escrow operation in one call (the HTTP API's fast front)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04

An idempotent POST /v1/escrows or /release took five round trips in its transaction:
BEGIN, the idempotency claim, the escrow function, storing the response, COMMIT. These
functions make the claim and, only when the key is new, the escrow operation, in one call;
with BEGIN pipelined before it and the stored response's UPDATE with COMMIT after it, the
request takes two round trips. When the key was used before they return that record
instead (the caller replays it or answers 409), and change nothing.

The claim is the INSERT ... ON CONFLICT DO NOTHING of escrow/idempotency.begin: it waits
for a concurrent claim of the same key to commit, then the record read after it (a new
snapshot: plpgsql statements of a VOLATILE function each take one) is the committed one.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Both functions return the same columns and start with the same claim: the key's row
# inserted, or, when it exists, that record returned and nothing else done.
_CLAIMED = """RETURNS TABLE (
    claim_id bigint, outcome text, detail text, escrow json, stored_hash text,
    stored_status int, stored_body text, stored_method text, stored_path text
)
LANGUAGE plpgsql AS $$
DECLARE
    v_claim bigint;
BEGIN
    INSERT INTO idempotency_keys
        (principal, key, method, path, request_hash, response_status, response_body, created_at)
    VALUES (p_principal, p_key, p_method, left(p_path, 500), p_request_hash, 0, '', p_now)
    ON CONFLICT (principal, key) DO NOTHING
    RETURNING id INTO v_claim;
    IF v_claim IS NULL THEN
        RETURN QUERY
            SELECT NULL::bigint, NULL::text, NULL::text, NULL::json,
                   k.request_hash::text, k.response_status, k.response_body, k.method::text,
                   k.path::text
            FROM idempotency_keys k WHERE k.principal = p_principal AND k.key = p_key;
        RETURN;
    END IF;
"""

FUNCTIONS = """
-- escrowd_fund_escrow behind an idempotency claim. claim_id NULL: the key was used before,
-- stored_* is its record and nothing was written.
CREATE FUNCTION escrowd_claim_fund_escrow(
    p_principal text, p_key text, p_method text, p_path text, p_request_hash text,
    p_job_id text, p_buyer_id bigint, p_worker_id bigint, p_asset text, p_amount bigint,
    p_fee_bps int, p_expires_at timestamptz, p_actor text, p_batch_id text,
    p_now timestamptz, p_now_text text, p_api_version text
) {claimed}    RETURN QUERY
        SELECT v_claim, f.outcome, f.detail, f.escrow, NULL::text, NULL::int, NULL::text,
               NULL::text, NULL::text
        FROM escrowd_fund_escrow(
            p_job_id, p_buyer_id, p_worker_id, p_asset, p_amount, p_fee_bps, p_expires_at,
            p_actor, p_batch_id, p_now, p_now_text, p_api_version) f;
END;
$$;

-- escrowd_settle_escrow behind an idempotency claim, as above.
CREATE FUNCTION escrowd_claim_settle_escrow(
    p_principal text, p_key text, p_method text, p_path text, p_request_hash text,
    p_job_id text, p_new_status text, p_allowed text[], p_worker_gross bigint, p_actor text,
    p_batch_id text, p_now timestamptz, p_now_text text, p_api_version text
) {claimed}    RETURN QUERY
        SELECT v_claim, f.outcome, f.detail, f.escrow, NULL::text, NULL::int, NULL::text,
               NULL::text, NULL::text
        FROM escrowd_settle_escrow(
            p_job_id, p_new_status, p_allowed, p_worker_gross, p_actor, p_batch_id, p_now,
            p_now_text, p_api_version) f;
END;
$$;
""".replace("{claimed}", _CLAIMED)

_SIGNATURES = (
    "escrowd_claim_fund_escrow(text, text, text, text, text, text, bigint, bigint, text,"
    " bigint, int, timestamptz, text, text, timestamptz, text, text)",
    "escrowd_claim_settle_escrow(text, text, text, text, text, text, text, text[], bigint,"
    " text, text, timestamptz, text, text)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTIONS)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for signature in _SIGNATURES:
        op.execute(f"DROP FUNCTION {signature}")
