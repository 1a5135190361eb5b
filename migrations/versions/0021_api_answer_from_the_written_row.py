"""an API write's response rendered from the row it wrote, in fewer steps

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-04

Issue 19: rendering the response of an API fund or release took a sixth of PostgreSQL's CPU
per request. pgbench calling escrowd_api_settle_escrow directly, 16 clients, busy CPU of the
machine per call, alternating: 1,047 us mean; 874 us with the re-read of the escrow and its
rendering left out (5 pairs). Single client, a fresh transaction per call: the rendering
took 48 us, of which 19 us were the lookup of the parties' names and most of the rest the
executable form of the expression, built again in every transaction (a step per function
call or operator: ~36 concatenations, ~25 steps per amount).

So:
- escrowd_fund_escrow and escrowd_settle_escrow also return the row they wrote and the
  parties' names, read by the statement that already read them for the event;
- the API functions render from those, without reading the escrow again, in their own
  body (escrowd_api_answer, a set-returning function called per request, goes);
- the rendering is one format() call (escrowd_escrow_json, inlined), and an amount is the
  product with 10 ^ -decimals, its trailing zeros trimmed (7 steps instead of ~25);
- a settlement updates the buyer's and the worker's accounts and looks up the fee account
  in its own body, where escrowd_release_hold, escrowd_credit_agent and escrowd_account were
  a PL/pgSQL call each (escrowd_account with a SET clause to save and restore). The last two
  stay for an account that is not there yet; escrowd_release_hold had no other caller and
  goes.

The bytes are the same (tests/test_api_rendered_in_db.py compares them with the API's
response models); escrowd_escrow_body, which looked the names up itself, goes.
"""

from collections.abc import Sequence

from alembic import op

from escrowd.migrations import earlier

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_0016 = "0016_escrowed_on_the_buyer_account.py"
_0017 = "0017_api_escrow_calls_in_one_statement.py"
_0019 = "0019_fund_locks_audit_heads_first.py"

_FUND = (
    "escrowd_fund_escrow(text, bigint, bigint, text, bigint, int, timestamptz, text, text,"
    " timestamptz, text, text)"
)
_SETTLE = "escrowd_settle_escrow(text, text, text[], bigint, text, text, timestamptz, text, text)"
_RELEASE_HOLD = "escrowd_release_hold(bigint, text, bigint, bigint)"
_ANSWER_BEFORE = (
    "escrowd_api_answer(text, text, text, text, text[], int[], text, text, text, text, text,"
    " int, timestamptz)"
)

# (what the function had, what it has now) in both escrow functions.
_RETURNED = (
    (
        ") RETURNS TABLE (outcome text, detail text, escrow json)\n",
        ") RETURNS TABLE (outcome text, detail text, escrow json, escrow_row escrows,\n"
        "    buyer_external_id text, worker_external_id text)\n",
    ),
    ("    e escrows;\n", "    e escrows;\n    v_buyer text;\n    v_worker text;\n"),
)
_REFUSED = ("NULL::json", "NULL::json, NULL::escrows, NULL::text, NULL::text")

# The buyer's leg of a settlement, as escrowd_release_hold did it; written twice, as before.
_HOLD = """        UPDATE ledger_accounts a SET escrowed = a.escrowed - e.amount,
            credits_posted = a.credits_posted + e.refund_amount
        WHERE a.kind = 'agent_available' AND a.owner = e.buyer_agent_id::text
          AND a.asset = e.asset
        RETURNING a.id INTO v_buyer_account;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'agent % has no % account holding its escrow', e.buyer_agent_id,
                e.asset;
        END IF;
"""
_HELD = """        v_buyer_account := escrowd_release_hold(e.buyer_agent_id, e.asset, e.amount,
            e.refund_amount);
"""
# A settlement's account updates in its own body instead of a call each: a PL/pgSQL call
# (and escrowd_account's SET clause) costs more than its one statement. The functions stay
# for the rare case (an account to create) and the other callers.
_INLINED = (
    (
        "    IF e.buyer_agent_id < e.worker_agent_id OR e.worker_amount = 0 THEN\n" + _HELD,
        "    IF e.buyer_agent_id < e.worker_agent_id OR e.worker_amount = 0 THEN\n" + _HOLD,
    ),
    (
        "    IF v_buyer_account IS NULL THEN\n" + _HELD,
        "    IF v_buyer_account IS NULL THEN\n" + _HOLD,
    ),
    (
        """        v_credits := v_credits || escrowd_credit_agent(e.worker_agent_id, e.asset,
            e.worker_amount, p_now);
""",
        """        UPDATE ledger_accounts a SET credits_posted = a.credits_posted + e.worker_amount
        WHERE a.kind = 'agent_available' AND a.owner = e.worker_agent_id::text
          AND a.asset = e.asset
        RETURNING a.id INTO v_credit;
        IF NOT FOUND THEN
            v_credit := escrowd_credit_agent(e.worker_agent_id, e.asset, e.worker_amount,
                p_now);
        END IF;
        v_credits := v_credits || v_credit;
""",
    ),
    (
        """        v_credits := v_credits
            || escrowd_account('platform_fees', 'platform', e.asset, false, p_now);
""",
        """        SELECT a.id INTO v_credit FROM ledger_accounts a
        WHERE a.kind = 'platform_fees' AND a.owner = 'platform' AND a.asset = e.asset;
        IF NOT FOUND THEN
            v_credit := escrowd_account('platform_fees', 'platform', e.asset, false, p_now);
        END IF;
        v_credits := v_credits || v_credit;
""",
    ),
    ("    v_buyer_account bigint;\n", "    v_buyer_account bigint;\n    v_credit bigint;\n"),
)

# The event's INSERT reads the parties' names for its payload; it keeps them for the answer.
_NAMED = """    WITH names AS (
        SELECT b.external_id AS buyer, w.external_id AS worker
        FROM agents b, agents w WHERE b.id = {buyer} AND w.id = {worker}
    ), posted AS (
        INSERT INTO webhook_events (type, api_version, payload, fanned_out, created_at)
        SELECT {type}, p_api_version,
            escrowd_escrow_event({type}, p_api_version, e, n.buyer, n.worker), false, p_now
        FROM names n
    )
    SELECT n.buyer, n.worker INTO v_buyer, v_worker FROM names n;
    RETURN QUERY SELECT '{outcome}'::text, NULL::text, row_to_json(e), e, v_buyer, v_worker;
"""
_FUND_EVENT = (
    """    INSERT INTO webhook_events (type, api_version, payload, fanned_out, created_at)
    SELECT 'escrow.funded', p_api_version,
        escrowd_escrow_event('escrow.funded', p_api_version, e, b.external_id,
            w.external_id),
        false, p_now
    FROM agents b, agents w WHERE b.id = p_buyer_id AND w.id = p_worker_id;
    RETURN QUERY SELECT 'funded'::text, NULL::text, row_to_json(e);
""",
    _NAMED.format(
        buyer="p_buyer_id", worker="p_worker_id", type="'escrow.funded'", outcome="funded"
    ),
)
_SETTLE_EVENT = (
    """    INSERT INTO webhook_events (type, api_version, payload, fanned_out, created_at)
    SELECT 'escrow.' || e.status, p_api_version,
        escrowd_escrow_event('escrow.' || e.status, p_api_version, e, b.external_id,
            w.external_id),
        false, p_now
    FROM agents b, agents w WHERE b.id = e.buyer_agent_id AND w.id = e.worker_agent_id;
    RETURN QUERY SELECT 'settled'::text, NULL::text, row_to_json(e);
""",
    _NAMED.format(
        buyer="e.buyer_agent_id",
        worker="e.worker_agent_id",
        type="'escrow.' || e.status",
        outcome="settled",
    ),
)

# Colons before words are escaped (\:) for op.execute's bind parameter parsing.
FUNCTIONS = r"""
-- escrow/money.format_amount as a JSON string: "12.5", no trailing zeros; null for NULL.
-- The product with 10 ^ -decimals (0 to 18) is exact, trim_scale drops the zeros.
CREATE OR REPLACE FUNCTION escrowd_json_amount(p_units bigint, p_decimals int) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce('"' || trim_scale(p_units * ('{1,0.1,0.01,0.001,0.0001,0.00001,'
        '0.000001,0.0000001,0.00000001,0.000000001,0.0000000001,0.00000000001,'
        '0.000000000001,0.0000000000001,0.00000000000001,0.000000000000001,'
        '0.0000000000000001,0.00000000000000001,0.000000000000000001}'
        ::numeric[])[p_decimals + 1])::text || '"', 'null')
$$;

-- The deposit an escrow was funded from, as EscrowOut.funded_from_deposit writes it.
-- PL/pgSQL keeps the statement's plan for the session; a SQL function with a FROM is
-- planned again at every call.
CREATE FUNCTION escrowd_escrow_deposit(e escrows) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_deposit text;
BEGIN
    SELECT '{"deposit_id":' || d.id::text
        || ',"network":' || to_json(d.chain)::text
        || ',"tx_hash":' || to_json(d.tx_hash)::text
        || ',"log_index":' || d.log_index::text
        || ',"depositor_address":' || coalesce(to_json(e.depositor_address)::text, 'null')
        || '}'
    INTO v_deposit FROM deposits d WHERE d.id = e.deposit_id;
    RETURN v_deposit;
END;
$$;

-- daemon/api_schemas.EscrowOut as the API renders it (api._escrow_out), in field order,
-- from the row and its parties' external ids. No FROM, so the planner inlines it into the
-- caller's expression.
CREATE FUNCTION escrowd_escrow_json(e escrows, p_buyer text, p_worker text, p_decimals int)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format('{"job_id":%s,"status":%s,"buyer":%s,"worker":%s,"asset":%s,"amount":%s,'
        '"amount_base_units":"%s","fee_bps":%s,"worker_amount":%s,'
        '"worker_amount_base_units":%s,"fee_amount":%s,"fee_amount_base_units":%s,'
        '"refund_amount":%s,"refund_amount_base_units":%s,"expires_at":%s,'
        '"resolved_at":%s,"created_at":%s,"funded_from_deposit":%s}',
        to_json(e.job_id), to_json(e.status), to_json(p_buyer), to_json(p_worker),
        to_json(e.asset), escrowd_json_amount(e.amount, p_decimals), e.amount, e.fee_bps,
        escrowd_json_amount(e.worker_amount, p_decimals), escrowd_json_units(e.worker_amount),
        escrowd_json_amount(e.fee_amount, p_decimals), escrowd_json_units(e.fee_amount),
        escrowd_json_amount(e.refund_amount, p_decimals), escrowd_json_units(e.refund_amount),
        escrowd_json_time(e.expires_at), escrowd_json_time(e.resolved_at),
        escrowd_json_time(e.created_at),
        CASE WHEN e.deposit_id IS NULL THEN 'null' ELSE escrowd_escrow_deposit(e) END)
$$;
"""


def _edited(text: str, edits: tuple[tuple[str, str], ...]) -> str:
    for old, new in edits:
        if text.count(old) != 1:
            raise RuntimeError(f"expected one {old!r} in the function to change")
        text = text.replace(old, new)
    return text


def _returning_names(function: str, event: tuple[str, str], refusals: int) -> str:
    if function.count(_REFUSED[0]) != refusals:
        raise RuntimeError(f"expected {refusals} refusals in the function to change")
    return _edited(function, (*_RETURNED, event)).replace(*_REFUSED)


# What an API function answers once its operation ran (f: the operation's outcome), as
# revision 0017's escrowd_api_answer did it, in the API function's own body (a call of a
# set-returning function costs a scan of its result besides the call), from the row and
# names the operation returned.
_ANSWER_EDITS = (
    ("    IF p_outcome <> p_done THEN\n", "    IF f.outcome <> '{done}' THEN\n"),
    ("RETURN QUERY SELECT p_outcome, p_detail,", "RETURN QUERY SELECT f.outcome, f.detail,"),
    (
        "    -- The row this transaction just wrote.\n"
        "    SELECT x.* INTO e FROM escrows x WHERE x.job_id = p_job_id;\n"
        "    v_body := escrowd_escrow_body(e, p_scales[array_position(p_symbols, e.asset::text)]);\n",
        "    e := f.escrow_row;\n"
        "    v_body := escrowd_escrow_json(e, f.buyer_external_id, f.worker_external_id,\n"
        "        p_scales[array_position(p_symbols, e.asset::text)]);\n",
    ),
    (
        "RETURN QUERY SELECT p_outcome, NULL::text, v_body,",
        "RETURN QUERY SELECT f.outcome, NULL::text, v_body,",
    ),
)

# Where revision 0017's API functions called escrowd_api_answer.
_ANSWER_CALL = """    RETURN QUERY SELECT * FROM escrowd_api_answer(f.outcome, f.detail, p_job_id, '{done}',
        p_symbols, p_scales, p_principal, p_key, p_method, p_path, p_request_hash, p_status,
        p_now);
"""


def _answer() -> str:
    """The statements of revision 0017's escrowd_api_answer, edited as above."""
    function = earlier.function(_0017, "escrowd_api_answer")
    body = function[function.index("BEGIN\n") + len("BEGIN\n") : function.index("END;\n$$;")]
    return _edited(body, _ANSWER_EDITS)


def _api_function(name: str, done: str) -> str:
    """An API function of revision 0017 answering in its own body."""
    declared = "    f record;\n"
    return _edited(
        earlier.function(_0017, name),
        (
            (declared, declared + "    e escrows;\n    v_body text;\n    v_claim bigint;\n"),
            (_ANSWER_CALL.replace("{done}", done), _answer().replace("{done}", done)),
        ),
    )


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    fund = _returning_names(earlier.revision(_0019).fund_function(), _FUND_EVENT, 2)
    settle = _edited(
        _returning_names(earlier.revision(_0016).settle_function(), _SETTLE_EVENT, 3), _INLINED
    )
    # What they return changes, which CREATE OR REPLACE cannot do.
    op.execute(f"DROP FUNCTION {_FUND}")
    op.execute(f"DROP FUNCTION {_SETTLE}")
    op.execute(fund)
    op.execute(settle)
    op.execute(FUNCTIONS)
    op.execute(_api_function("escrowd_api_fund_escrow", "funded"))
    op.execute(_api_function("escrowd_api_settle_escrow", "settled"))
    op.execute(f"DROP FUNCTION {_ANSWER_BEFORE}")
    op.execute("DROP FUNCTION escrowd_escrow_body(escrows, int)")
    op.execute(f"DROP FUNCTION {_RELEASE_HOLD}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"DROP FUNCTION {_FUND}")
    op.execute(f"DROP FUNCTION {_SETTLE}")
    op.execute("DROP FUNCTION escrowd_escrow_json(escrows, text, text, int)")
    op.execute("DROP FUNCTION escrowd_escrow_deposit(escrows)")
    op.execute(earlier.function(_0016, "escrowd_release_hold", "_RELEASE_HOLD"))
    op.execute(earlier.revision(_0019).fund_function())
    op.execute(earlier.revision(_0016).settle_function())
    for name in (
        "escrowd_json_amount",
        "escrowd_escrow_body",
        "escrowd_api_answer",
        "escrowd_api_fund_escrow",
        "escrowd_api_settle_escrow",
    ):
        op.execute(earlier.function(_0017, name))
