"""escrow operations in one round trip on PostgreSQL

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

escrowd_fund_escrow and escrowd_settle_escrow do on the server what escrow/service.py's
Python path does statement by statement (about ten statements per operation, each with its
SQLAlchemy and driver overhead on the client): the escrow row, its ledger accounts, the
ledger transfers (through escrowd_post), the audit row of the state change and the webhook
outbox event, with the same checks and outcomes and byte-identical audit rows and event
payloads. tests/test_escrow_pg_fastpath.py runs both paths and compares them. Change them
together.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = r"""
-- A string as escrow/audit.canonical_json writes it (json.dumps, ensure_ascii): quote and
-- backslash escaped, \b \f \n \r \t short, every other character outside space..tilde as
-- \uXXXX (a surrogate pair above U+FFFF). Hashes cover these bytes, so exactness matters.
CREATE FUNCTION escrowd_json_text(value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    out text := '"';
    ch text;
    cp int;
BEGIN
    IF value !~ '[^ -~]' THEN
        RETURN to_json(value)::text;
    END IF;
    FOREACH ch IN ARRAY regexp_split_to_array(value, '') LOOP
        cp := ascii(ch);
        out := out || CASE
            WHEN cp = 34 THEN '\"'
            WHEN cp = 92 THEN '\\'
            WHEN cp = 8 THEN '\b'
            WHEN cp = 12 THEN '\f'
            WHEN cp = 10 THEN '\n'
            WHEN cp = 13 THEN '\r'
            WHEN cp = 9 THEN '\t'
            WHEN cp BETWEEN 32 AND 126 THEN ch
            WHEN cp < 65536 THEN '\u' || lpad(to_hex(cp), 4, '0')
            ELSE '\u' || to_hex(55296 + ((cp - 65536) >> 10))
                 || '\u' || to_hex(56320 + ((cp - 65536) & 1023))
        END;
    END LOOP;
    RETURN out || '"';
END;
$$;

-- escrow/ledger.get_or_create_account.
CREATE FUNCTION escrowd_account(
    p_kind text, p_owner text, p_asset text, p_no_overdraft boolean, p_now timestamptz
) RETURNS bigint
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT a.id INTO v_id FROM ledger_accounts a
    WHERE a.kind = p_kind AND a.owner = p_owner AND a.asset = p_asset;
    IF FOUND THEN
        RETURN v_id;
    END IF;
    INSERT INTO ledger_accounts (kind, owner, asset, no_overdraft, debits_posted,
        credits_posted, created_at)
    VALUES (p_kind, p_owner, p_asset, p_no_overdraft, 0, 0, p_now)
    ON CONFLICT (kind, owner, asset) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        SELECT a.id INTO v_id FROM ledger_accounts a
        WHERE a.kind = p_kind AND a.owner = p_owner AND a.asset = p_asset;
    END IF;
    RETURN v_id;
END;
$$;

-- One row appended to a stream, hashed as escrow/audit.row_digest does.
CREATE FUNCTION escrowd_audit_append(
    p_stream text, p_actor text, p_action text, p_asset text, p_amount bigint, p_details text,
    p_created_at timestamptz, p_created_text text
) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_seq int;
    v_prev text;
    v_hash text;
    v_new_stream boolean;
BEGIN
    SELECT h.seq, h.row_hash INTO v_seq, v_prev FROM audit_heads h
    WHERE h.stream = p_stream FOR UPDATE;
    v_new_stream := NOT FOUND;
    IF v_new_stream THEN
        v_seq := 0;
        v_prev := repeat('0', 64);
    END IF;
    v_seq := v_seq + 1;
    v_hash := encode(sha256(convert_to(
        escrowd_netstring(p_stream) || escrowd_netstring(v_seq::text)
        || escrowd_netstring(p_actor) || escrowd_netstring(p_action)
        || escrowd_netstring(p_asset) || escrowd_netstring(p_amount::text)
        || escrowd_netstring(p_details) || escrowd_netstring(p_created_text)
        || escrowd_netstring(v_prev), 'UTF8')), 'hex');
    INSERT INTO audit_log (stream, seq, actor, action, asset, amount, details, created_at,
        prev_hash, row_hash)
    VALUES (p_stream, v_seq, p_actor, p_action, p_asset, p_amount, p_details, p_created_at,
        v_prev, v_hash);
    IF v_new_stream THEN
        INSERT INTO audit_heads (stream, seq, row_hash) VALUES (p_stream, v_seq, v_hash)
        ON CONFLICT (stream) DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'serialization_failure', MESSAGE = format(
                'audit stream %s was created by a concurrent transaction', p_stream);
        END IF;
    ELSE
        UPDATE audit_heads SET seq = v_seq, row_hash = v_hash WHERE stream = p_stream;
    END IF;
END;
$$;

-- escrow/service._record's audit details: {"fee_amount", "refund_amount", "status",
-- "worker_amount"} in canonical form.
CREATE FUNCTION escrowd_escrow_audit_details(e escrows) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '{"fee_amount":' || coalesce(e.fee_amount::text, 'null')
        || ',"refund_amount":' || coalesce(e.refund_amount::text, 'null')
        || ',"status":' || escrowd_json_text(e.status)
        || ',"worker_amount":' || coalesce(e.worker_amount::text, 'null') || '}'
$$;

-- escrow/events._payload of escrow/service._event_data, in canonical form.
CREATE FUNCTION escrowd_escrow_event(
    p_type text, p_api_version text, e escrows, p_buyer text, p_worker text
) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT '{"api_version":' || escrowd_json_text(p_api_version)
        || ',"data":{"amount_base_units":"' || e.amount::text
        || '","asset":' || escrowd_json_text(e.asset)
        || ',"buyer":' || escrowd_json_text(p_buyer)
        || ',"escrow_id":' || e.id::text
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

-- One leg for escrowd_post's JSON: its audit details up to the transfer id are
-- escrow/ledger._audit_details in canonical form.
CREATE FUNCTION escrowd_escrow_leg(
    p_job_id text, p_leg text, p_debit bigint, p_credit bigint, p_amount bigint, p_code text,
    p_batch_id text
) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_array(
        'escrow:' || p_job_id || ':' || p_leg, p_debit, p_credit, p_amount, p_code, 'escrow',
        p_job_id, 'escrow:' || p_job_id,
        '{"batch_id":' || escrowd_json_text(p_batch_id)
        || ',"credit_account_id":' || p_credit::text
        || ',"debit_account_id":' || p_debit::text
        || ',"idempotency_key":' || escrowd_json_text('escrow:' || p_job_id || ':' || p_leg)
        || ',"ref":' || escrowd_json_text('escrow:' || p_job_id)
        || ',"transfer_id":')
$$;

-- The state change's audit row and webhook event, after its ledger transfers.
CREATE FUNCTION escrowd_escrow_record(
    e escrows, p_actor text, p_now timestamptz, p_now_text text, p_api_version text
) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_buyer text;
    v_worker text;
BEGIN
    PERFORM escrowd_audit_append('escrow:' || e.job_id, p_actor, 'escrow_' || e.status, e.asset,
        e.amount, escrowd_escrow_audit_details(e), p_now, p_now_text);
    SELECT b.external_id, w.external_id INTO v_buyer, v_worker
    FROM agents b, agents w WHERE b.id = e.buyer_agent_id AND w.id = e.worker_agent_id;
    INSERT INTO webhook_events (type, api_version, payload, fanned_out, created_at)
    VALUES ('escrow.' || e.status, p_api_version,
        escrowd_escrow_event('escrow.' || e.status, p_api_version, e, v_buyer, v_worker),
        false, p_now);
END;
$$;

-- escrow/service.fund_escrow after its argument checks. Outcomes: funded (with the new
-- escrow as JSON), conflict (detail: the existing escrow's status), insufficient_funds
-- (nothing written).
CREATE FUNCTION escrowd_fund_escrow(
    p_job_id text, p_buyer_id bigint, p_worker_id bigint, p_asset text, p_amount bigint,
    p_fee_bps int, p_expires_at timestamptz, p_actor text, p_batch_id text,
    p_now timestamptz, p_now_text text, p_api_version text
) RETURNS TABLE (outcome text, detail text, escrow json)
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    e escrows;
    v_buyer_account bigint;
    v_escrow_account bigint;
    v_status text;
    v_message text;
BEGIN
    -- A refusal rolls back this block (the escrow row and new accounts with it).
    BEGIN
        INSERT INTO escrows AS x (job_id, buyer_agent_id, worker_agent_id, asset, amount,
            fee_bps, status, expires_at, created_at, updated_at)
        VALUES (p_job_id, p_buyer_id, p_worker_id, p_asset, p_amount, p_fee_bps, 'funded',
            p_expires_at, p_now, p_now)
        ON CONFLICT (job_id) DO NOTHING
        RETURNING x.* INTO e;
        IF e.id IS NULL THEN
            RETURN QUERY SELECT 'conflict'::text, x.status::text, NULL::json
                FROM escrows x WHERE x.job_id = p_job_id;
            RETURN;
        END IF;
        v_buyer_account := escrowd_account(
            'agent_available', p_buyer_id::text, p_asset, true, p_now);
        v_escrow_account := escrowd_account('escrow', p_job_id, p_asset, true, p_now);
        SELECT p.status, p.message INTO v_status, v_message FROM escrowd_post(
            json_build_array(escrowd_escrow_leg(p_job_id, 'fund', v_buyer_account,
                v_escrow_account, p_amount, 'escrow_fund', p_batch_id))::text,
            p_actor, p_batch_id, p_now, p_now_text) AS p LIMIT 1;
        IF v_status <> 'posted' THEN
            RAISE EXCEPTION USING ERRCODE = 'EL002', MESSAGE = v_status,
                DETAIL = coalesce(v_message, '');
        END IF;
        PERFORM escrowd_escrow_record(e, p_actor, p_now, p_now_text, p_api_version);
    EXCEPTION WHEN SQLSTATE 'EL002' THEN
        GET STACKED DIAGNOSTICS v_status = MESSAGE_TEXT, v_message = PG_EXCEPTION_DETAIL;
        RETURN QUERY SELECT v_status, v_message, NULL::json;
        RETURN;
    END;
    RETURN QUERY SELECT 'funded'::text, NULL::text, row_to_json(e);
END;
$$;

-- escrow/service._settle for release, refund and resolve: worker_gross (NULL: the whole
-- amount) minus its fee to the worker, the fee to the platform, the rest to the buyer.
-- Outcomes: settled (with the escrow as JSON), not_found, conflict (detail: the escrow's
-- status), invalid_amount (detail: the escrowed amount); refusals write nothing.
CREATE FUNCTION escrowd_settle_escrow(
    p_job_id text, p_new_status text, p_allowed text[], p_worker_gross bigint, p_actor text,
    p_batch_id text, p_now timestamptz, p_now_text text, p_api_version text
) RETURNS TABLE (outcome text, detail text, escrow json)
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    e escrows;
    v_gross bigint;
    v_fee bigint;
    v_net bigint;
    v_refund bigint;
    v_escrow_account bigint;
    v_account bigint;
    v_legs json[] := ARRAY[]::json[];
    v_status text;
    v_message text;
BEGIN
    SELECT x.* INTO e FROM escrows x WHERE x.job_id = p_job_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, NULL::text, NULL::json;
        RETURN;
    END IF;
    IF NOT e.status = ANY (p_allowed) THEN
        RETURN QUERY SELECT 'conflict'::text, e.status::text, NULL::json;
        RETURN;
    END IF;
    v_gross := coalesce(p_worker_gross, e.amount);
    IF v_gross < 0 OR v_gross > e.amount THEN
        RETURN QUERY SELECT 'invalid_amount'::text, e.amount::text, NULL::json;
        RETURN;
    END IF;
    -- floor(gross * bps / 10000) without overflowing bigint on the way.
    v_fee := div(v_gross::numeric * e.fee_bps, 10000)::bigint;
    v_net := v_gross - v_fee;
    v_refund := e.amount - v_gross;
    -- Account ids go through variables: escrowd_escrow_leg is inlined (planned once per
    -- session) only when its arguments are plain values.
    v_escrow_account := escrowd_account('escrow', e.job_id, e.asset, true, p_now);
    IF v_net > 0 THEN
        v_account := escrowd_account(
            'agent_available', e.worker_agent_id::text, e.asset, true, p_now);
        v_legs := v_legs || escrowd_escrow_leg(e.job_id, 'worker', v_escrow_account,
            v_account, v_net, 'escrow_release', p_batch_id);
    END IF;
    IF v_fee > 0 THEN
        v_account := escrowd_account('platform_fees', 'platform', e.asset, false, p_now);
        v_legs := v_legs || escrowd_escrow_leg(e.job_id, 'fee', v_escrow_account,
            v_account, v_fee, 'fee', p_batch_id);
    END IF;
    IF v_refund > 0 THEN
        v_account := escrowd_account(
            'agent_available', e.buyer_agent_id::text, e.asset, true, p_now);
        v_legs := v_legs || escrowd_escrow_leg(e.job_id, 'refund', v_escrow_account,
            v_account, v_refund, 'refund', p_batch_id);
    END IF;
    SELECT p.status, p.message INTO v_status, v_message FROM escrowd_post(
        array_to_json(v_legs)::text, p_actor, p_batch_id, p_now, p_now_text) AS p LIMIT 1;
    IF v_status <> 'posted' THEN
        -- An escrow account always holds exactly its amount; anything else is corruption.
        RAISE EXCEPTION 'escrow % could not be settled: % %', e.job_id, v_status, v_message;
    END IF;
    UPDATE escrows x SET status = p_new_status, worker_amount = v_net, fee_amount = v_fee,
        refund_amount = v_refund, resolved_at = p_now, updated_at = p_now
    WHERE x.id = e.id
    RETURNING x.* INTO e;
    PERFORM escrowd_escrow_record(e, p_actor, p_now, p_now_text, p_api_version);
    RETURN QUERY SELECT 'settled'::text, NULL::text, row_to_json(e);
END;
$$;
"""

DROP_FUNCTIONS = (
    "DROP FUNCTION escrowd_settle_escrow(text, text, text[], bigint, text, text, timestamptz,"
    " text, text)",
    "DROP FUNCTION escrowd_fund_escrow(text, bigint, bigint, text, bigint, int, timestamptz,"
    " text, text, timestamptz, text, text)",
    "DROP FUNCTION escrowd_escrow_record(escrows, text, timestamptz, text, text)",
    "DROP FUNCTION escrowd_escrow_leg(text, text, bigint, bigint, bigint, text, text)",
    "DROP FUNCTION escrowd_escrow_event(text, text, escrows, text, text)",
    "DROP FUNCTION escrowd_escrow_audit_details(escrows)",
    "DROP FUNCTION escrowd_audit_append(text, text, text, text, bigint, text, timestamptz, text)",
    "DROP FUNCTION escrowd_account(text, text, text, boolean, timestamptz)",
    "DROP FUNCTION escrowd_json_text(text)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTIONS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in DROP_FUNCTIONS:
            op.execute(statement)
