"""the HTTP API's fund and release in one autocommit statement

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04

Issue 19: the fast front's idempotent fund and release took two round trips and wrote the
idempotency row twice: BEGIN, the claim (a placeholder row) with the escrow operation; then
Python rendered the response and stored it with an UPDATE and COMMIT. The buyer's account
row stayed locked across the second round trip, so funds of one buyer queued behind each
other's rendering on a busy event loop.

These functions do it in one statement, which PostgreSQL runs as its own transaction:

- a request whose key the API process counts itself (a lease, escrow/ratelimit.py) has its
  key checked here as the process would (the secret's hash, not revoked, a scope that may
  write, the limit the lease was claimed under); otherwise nothing is done (`key_refused`);
- the escrow operation (escrowd_fund_escrow, escrowd_settle_escrow);
- done: the response (EscrowOut's JSON, byte for byte what the API renders; the tests
  compare them) goes into the idempotency row, written once;
- refused (conflict, insufficient funds, ...): the key's stored record, if it has one, is
  the answer (a retry of a request that succeeded finds its escrow settled or its job
  taken), else the refusal; nothing is written.

A key used before for another request: the operation runs, the INSERT of the record finds
the key taken (after waiting for a concurrent claim to commit) and raises, so the statement
rolls back whole; the front hands the request to the FastAPI path, which answers 409.

Revision 0013's claim functions, which these replace, go. Formatting a response, an event
payload or audit details calls small SQL functions that the planner inlines; revision
0003's escrowd_json_text (PL/pgSQL, 10 to 15 calls per operation) becomes one of them for
printable ASCII strings and calls the old loop for the rest.
"""

from collections.abc import Sequence

from alembic import op

from escrowd.migrations import earlier

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Colons before words are escaped (\:) for op.execute's bind parameter parsing.
FUNCTIONS = r"""
-- 10 ^ p_decimals (0 to 18) from a constant array: numeric power() cost more than the rest
-- of an amount's formatting together. SQL functions with no FROM, so that the planner
-- inlines them into the statements that call them.
CREATE FUNCTION escrowd_unit(p_decimals int) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ('{1,10,100,1000,10000,100000,1000000,10000000,100000000,1000000000,'
        '10000000000,100000000000,1000000000000,10000000000000,100000000000000,'
        '1000000000000000,10000000000000000,100000000000000000,1000000000000000000}'
        ::bigint[])[p_decimals + 1]
$$;

-- escrow/money.format_amount as a JSON string: "12.5", no trailing zeros; null for NULL.
CREATE FUNCTION escrowd_json_amount(p_units bigint, p_decimals int) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_units IS NULL THEN 'null'
        WHEN p_decimals = 0 THEN '"' || p_units::text || '"'
        ELSE '"' || CASE WHEN p_units < 0 THEN '-' ELSE '' END
            || (abs(p_units) / escrowd_unit(p_decimals))::text
            || CASE WHEN abs(p_units) % escrowd_unit(p_decimals) = 0 THEN ''
                ELSE '.' || rtrim(lpad((abs(p_units) % escrowd_unit(p_decimals))::text,
                    p_decimals, '0'), '0')
                END
            || '"' END
$$;

-- A base-units amount as the API writes it: a JSON string of digits, null for NULL.
CREATE FUNCTION escrowd_json_units(p_units bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce('"' || p_units::text || '"', 'null')
$$;

-- An instant as pydantic writes a UTC datetime: seconds, microseconds only when not zero, Z.
CREATE FUNCTION escrowd_json_time(p_at timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_at IS NULL THEN 'null' ELSE
        '"' || regexp_replace(to_char(p_at AT TIME ZONE 'UTC',
            'YYYY-MM-DD"T"HH24\:MI\:SS.US'), '\.000000$', '') || 'Z"' END
$$;

-- daemon/api_schemas.EscrowOut as the API renders it (api._escrow_out), in field order.
-- PL/pgSQL keeps its statements' plans for the session; a SQL function with a FROM is
-- planned again at every call (0.7 ms here).
CREATE FUNCTION escrowd_escrow_body(e escrows, p_decimals int) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_buyer text;
    v_worker text;
    v_deposit text := 'null';
BEGIN
    SELECT b.external_id, w.external_id INTO v_buyer, v_worker
    FROM agents b, agents w WHERE b.id = e.buyer_agent_id AND w.id = e.worker_agent_id;
    IF e.deposit_id IS NOT NULL THEN
        SELECT '{"deposit_id":' || d.id::text
            || ',"network":' || to_json(d.chain)::text
            || ',"tx_hash":' || to_json(d.tx_hash)::text
            || ',"log_index":' || d.log_index::text
            || ',"depositor_address":' || coalesce(to_json(e.depositor_address)::text, 'null')
            || '}'
        INTO v_deposit FROM deposits d WHERE d.id = e.deposit_id;
    END IF;
    RETURN '{"job_id":' || to_json(e.job_id)::text
        || ',"status":' || to_json(e.status)::text
        || ',"buyer":' || to_json(v_buyer)::text
        || ',"worker":' || to_json(v_worker)::text
        || ',"asset":' || to_json(e.asset)::text
        || ',"amount":' || escrowd_json_amount(e.amount, p_decimals)
        || ',"amount_base_units":' || escrowd_json_units(e.amount)
        || ',"fee_bps":' || e.fee_bps::text
        || ',"worker_amount":' || escrowd_json_amount(e.worker_amount, p_decimals)
        || ',"worker_amount_base_units":' || escrowd_json_units(e.worker_amount)
        || ',"fee_amount":' || escrowd_json_amount(e.fee_amount, p_decimals)
        || ',"fee_amount_base_units":' || escrowd_json_units(e.fee_amount)
        || ',"refund_amount":' || escrowd_json_amount(e.refund_amount, p_decimals)
        || ',"refund_amount_base_units":' || escrowd_json_units(e.refund_amount)
        || ',"expires_at":' || escrowd_json_time(e.expires_at)
        || ',"resolved_at":' || escrowd_json_time(e.resolved_at)
        || ',"created_at":' || escrowd_json_time(e.created_at)
        || ',"funded_from_deposit":' || v_deposit
        || '}';
END;
$$;

-- Whether the key a request presents holds as the API process checks it
-- (daemon/api_deps.ApiState.admitted and admit): the secret's hash, not revoked, a scope
-- in p_scopes, and the limit and window its lease was claimed under. True when p_prefix
-- is NULL: the process checked and counted the key itself before.
CREATE FUNCTION escrowd_api_key_holds(
    p_prefix text, p_hash text, p_scopes text[], p_requests int, p_window_s int,
    p_default_requests int, p_default_window_s int
) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN p_prefix IS NULL OR EXISTS (
        SELECT 1 FROM api_keys k
        WHERE k.prefix = p_prefix AND k.key_hash = p_hash AND k.revoked_at IS NULL
          AND k.scope = ANY (p_scopes)
          AND coalesce(k.rate_limit_requests, p_default_requests) = p_requests
          AND coalesce(k.rate_limit_window_s, p_default_window_s) = p_window_s);
END;
$$;

-- What an operation's outcome answers: done (p_done), the escrow's response stored under
-- the key; refused, the key's stored record if it has one, else the refusal. p_symbols,
-- p_scales: each ledger asset's decimals.
CREATE FUNCTION escrowd_api_answer(
    p_outcome text, p_detail text, p_job_id text, p_done text, p_symbols text[],
    p_scales int[], p_principal text, p_key text, p_method text, p_path text,
    p_request_hash text, p_status int, p_now timestamptz
) {answer}
LANGUAGE plpgsql AS $$
DECLARE
    e escrows;
    v_body text;
    v_claim bigint;
BEGIN
    IF p_outcome <> p_done THEN
        RETURN QUERY
            SELECT 'stored'::text, NULL::text, NULL::text, NULL::bigint, NULL::bigint,
                   NULL::bigint, k.request_hash::text, k.response_status, k.response_body,
                   k.method::text, k.path::text
            FROM idempotency_keys k WHERE k.principal = p_principal AND k.key = p_key;
        IF NOT FOUND THEN
            RETURN QUERY SELECT p_outcome, p_detail, NULL::text, NULL::bigint, NULL::bigint,
                NULL::bigint, NULL::text, NULL::int, NULL::text, NULL::text, NULL::text;
        END IF;
        RETURN;
    END IF;
    -- The row this transaction just wrote.
    SELECT x.* INTO e FROM escrows x WHERE x.job_id = p_job_id;
    v_body := escrowd_escrow_body(e, p_scales[array_position(p_symbols, e.asset::text)]);
    INSERT INTO idempotency_keys
        (principal, key, method, path, request_hash, response_status, response_body, created_at)
    VALUES (p_principal, p_key, p_method, left(p_path, 500), p_request_hash, p_status, v_body,
        p_now)
    ON CONFLICT (principal, key) DO NOTHING
    RETURNING id INTO v_claim;
    IF v_claim IS NULL THEN
        RAISE EXCEPTION 'Idempotency-Key % was claimed by another request', p_key
            USING ERRCODE = 'unique_violation';
    END IF;
    RETURN QUERY SELECT p_outcome, NULL::text, v_body, e.worker_amount, e.fee_amount,
        e.refund_amount, NULL::text, NULL::int, NULL::text, NULL::text, NULL::text;
END;
$$;

CREATE FUNCTION escrowd_api_fund_escrow({checked}
    p_job_id text, p_buyer_id bigint, p_worker_id bigint, p_asset text, p_amount bigint,
    p_fee_bps int, p_expires_at timestamptz, p_actor text, p_batch_id text,
    p_now timestamptz, p_now_text text, p_api_version text
{answered}    SELECT * INTO f FROM escrowd_fund_escrow(p_job_id, p_buyer_id, p_worker_id, p_asset,
        p_amount, p_fee_bps, p_expires_at, p_actor, p_batch_id, p_now, p_now_text,
        p_api_version);
    RETURN QUERY SELECT * FROM escrowd_api_answer(f.outcome, f.detail, p_job_id, 'funded',
        p_symbols, p_scales, p_principal, p_key, p_method, p_path, p_request_hash, p_status,
        p_now);
END;
$$;

-- A settlement (the API's release) the same way.
CREATE FUNCTION escrowd_api_settle_escrow({checked}
    p_job_id text, p_new_status text, p_allowed text[], p_worker_gross bigint, p_actor text,
    p_batch_id text, p_now timestamptz, p_now_text text, p_api_version text
{answered}    SELECT * INTO f FROM escrowd_settle_escrow(p_job_id, p_new_status, p_allowed,
        p_worker_gross, p_actor, p_batch_id, p_now, p_now_text, p_api_version);
    RETURN QUERY SELECT * FROM escrowd_api_answer(f.outcome, f.detail, p_job_id, 'settled',
        p_symbols, p_scales, p_principal, p_key, p_method, p_path, p_request_hash, p_status,
        p_now);
END;
$$;
"""

# Both API functions take the key check's and the record's arguments first, and do
# nothing but answer `key_refused` when the key does not hold.
_CHECKED = """
    p_key_prefix text, p_key_hash text, p_scopes text[], p_requests int, p_window_s int,
    p_default_requests int, p_default_window_s int,
    p_principal text, p_key text, p_method text, p_path text, p_request_hash text,
    p_status int, p_symbols text[], p_scales int[],"""
_ANSWERED = """) {answer}
LANGUAGE plpgsql AS $$
DECLARE
    f record;
BEGIN
    IF NOT escrowd_api_key_holds(p_key_prefix, p_key_hash, p_scopes, p_requests, p_window_s,
            p_default_requests, p_default_window_s) THEN
        RETURN QUERY SELECT 'key_refused'::text, NULL::text, NULL::text, NULL::bigint,
            NULL::bigint, NULL::bigint, NULL::text, NULL::int, NULL::text, NULL::text,
            NULL::text;
        RETURN;
    END IF;
"""
# The columns every API function answers with (escrowd_api_answer's).
_ANSWER = """RETURNS TABLE (
    outcome text, detail text, body text, worker_amount bigint, fee_amount bigint,
    refund_amount bigint, stored_hash text, stored_status int, stored_body text,
    stored_method text, stored_path text
)"""
FUNCTIONS = (
    FUNCTIONS.replace("{checked}", _CHECKED)
    .replace("{answered}", _ANSWERED)
    .replace("{answer}", _ANSWER)
)

_0003 = "0003_escrow_hot_path.py"

# escrow/audit.canonical_json's string, as revision 0003's escrowd_json_text, without a
# PL/pgSQL call for a printable ASCII string (to_json writes those the same way): called
# 10 to 15 times per escrow operation (event payload, audit details), ~5 us each. STABLE
# as to_json is: the planner inlines no function declared less volatile than its body (as
# IMMUTABLE it ran as a SQL function, parsed and planned at every call, 18 us).
_JSON_TEXT = r"""
CREATE OR REPLACE FUNCTION escrowd_json_text(value text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN value !~ '[^ -~]' THEN to_json(value)::text
        ELSE escrowd_json_text_escaped(value) END
$$;
"""

# Revision 0013's claim functions.
_RETIRED = (
    "escrowd_claim_fund_escrow(text, text, text, text, text, text, bigint, bigint, text,"
    " bigint, int, timestamptz, text, text, timestamptz, text, text)",
    "escrowd_claim_settle_escrow(text, text, text, text, text, text, text, text[], bigint,"
    " text, text, timestamptz, text, text)",
)
_ADDED = (
    "escrowd_api_settle_escrow(text, text, text[], int, int, int, int, text, text, text, text,"
    " text, int, text[], int[], text, text, text[], bigint, text, text, timestamptz, text,"
    " text)",
    "escrowd_api_fund_escrow(text, text, text[], int, int, int, int, text, text, text, text,"
    " text, int, text[], int[], text, bigint, bigint, text, bigint, int, timestamptz, text,"
    " text, timestamptz, text, text)",
    "escrowd_api_answer(text, text, text, text, text[], int[], text, text, text, text, text,"
    " int, timestamptz)",
    "escrowd_api_key_holds(text, text, text[], int, int, int, int)",
    "escrowd_escrow_body(escrows, int)",
    "escrowd_json_time(timestamptz)",
    "escrowd_json_units(bigint)",
    "escrowd_json_amount(bigint, int)",
    "escrowd_unit(int)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTIONS)
    # The loop of escrowd_json_text for the strings it must escape; the function itself
    # becomes an inlinable SQL expression for the rest (every string the hot paths write).
    escaping = earlier.function(_0003, "escrowd_json_text")
    op.execute(escaping.replace("escrowd_json_text(", "escrowd_json_text_escaped(", 1))
    op.execute(_JSON_TEXT)
    for signature in _RETIRED:
        op.execute(f"DROP FUNCTION {signature}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for signature in _ADDED:
        op.execute(f"DROP FUNCTION {signature}")
    op.execute(earlier.revision("0013_api_idempotent_escrow_calls.py").FUNCTIONS)
    op.execute(earlier.function(_0003, "escrowd_json_text"))
    op.execute("DROP FUNCTION escrowd_json_text_escaped(text)")
