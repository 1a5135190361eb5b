"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from escrowd.models import base as models_base

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Ledger postings on PostgreSQL in one round trip (escrow/ledger_pg.py calls escrowd_post).
# It mirrors escrow/ledger.py's Python path: idempotent repeat or conflict, unknown account,
# asset mismatch, no-overdraft updates in account-id order, transfers, and audit rows hashed
# exactly as escrow/audit.row_digest does. Change them together.
POSTING_FUNCTIONS = """
CREATE FUNCTION escrowd_netstring(value text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN value IS NULL THEN '~'
           ELSE octet_length(convert_to(value, 'UTF8'))::text || ':' || value END
$$;

-- Lookups below go through "= ANY (array)" on an index, never a join with unnest():
-- a cached generic plan would guess 100 rows and hash-join against the whole table.
CREATE FUNCTION escrowd_post_existing(
    p_keys text[], p_debits bigint[], p_credits bigint[], p_amounts bigint[],
    p_codes text[], p_ref_types text[], p_ref_ids text[]
) RETURNS TABLE (status text, message text, transfer_id bigint, asset text, batch_id text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    i int;
    v_found int := 0;
    v_ids bigint[] := array_fill(NULL::bigint, ARRAY[cardinality(p_keys)]);
    v_assets text[] := array_fill(NULL::text, ARRAY[cardinality(p_keys)]);
    v_batches text[] := array_fill(NULL::text, ARRAY[cardinality(p_keys)]);
    v_differs boolean := false;
BEGIN
    FOR r IN
        SELECT t.id, t.idempotency_key, t.debit_account_id, t.credit_account_id, t.asset,
               t.amount, t.code, t.ref_type, t.ref_id, t.batch_id
        FROM ledger_transfers t WHERE t.idempotency_key = ANY (p_keys)
    LOOP
        v_found := v_found + 1;
        i := array_position(p_keys, r.idempotency_key::text);
        v_ids[i] := r.id;
        v_assets[i] := r.asset;
        v_batches[i] := r.batch_id;
        v_differs := v_differs OR (r.debit_account_id, r.credit_account_id, r.amount, r.code::text,
            r.ref_type::text, r.ref_id::text) IS DISTINCT FROM (p_debits[i], p_credits[i],
            p_amounts[i], p_codes[i], p_ref_types[i], p_ref_ids[i]);
    END LOOP;
    IF v_found = 0 THEN
        RETURN;
    END IF;
    IF v_found <> cardinality(p_keys) THEN
        RETURN QUERY SELECT 'idempotency_conflict'::text,
            'some of these idempotency keys were already used by another posting'::text,
            NULL::bigint, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF v_differs THEN
        RETURN QUERY SELECT 'idempotency_conflict'::text,
            'these idempotency keys were already used for a different transfer; '
            'use new keys for a new posting'::text,
            NULL::bigint, NULL::text, NULL::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'existing'::text, NULL::text, u.id, u.asset, u.batch_id
        FROM unnest(v_ids, v_assets, v_batches) AS u (id, asset, batch_id);
END;
$$;

CREATE FUNCTION escrowd_post(
    p_transfers text, p_actor text, p_batch_id text, p_created_at timestamptz,
    p_created_text text
) RETURNS TABLE (status text, message text, transfer_id bigint, asset text, batch_id text)
LANGUAGE plpgsql AS $$
DECLARE
    -- p_transfers: JSON [[key, debit id, credit id, amount, code, ref type, ref id,
    -- audit stream, audit details up to the transfer id], ...]
    n int;
    p_keys text[];
    p_debits bigint[];
    p_credits bigint[];
    p_amounts bigint[];
    p_codes text[];
    p_ref_types text[];
    p_ref_ids text[];
    p_streams text[];
    p_details_heads text[];
    a_ids bigint[];
    a_kinds text[];
    a_owners text[];
    a_assets text[];
    a_no_overdraft boolean[];
    r_kind text;
    r_owner text;
    r_asset text;
    r_no_overdraft boolean;
    i int;
    j int;
    d int;
    c int;
    v_debit_total numeric;
    v_credit_total numeric;
    v_missing bigint;
    v_mismatch text;
    v_assets text[] := ARRAY[]::text[];
    v_ids bigint[] := ARRAY[]::bigint[];
    v_id bigint;
    v_stream text;
    v_streams text[];
    v_seq int;
    v_prev text;
    v_details text;
    v_constraint text;
    l_streams text[] := ARRAY[]::text[];
    l_seqs int[] := ARRAY[]::int[];
    l_actions text[] := ARRAY[]::text[];
    l_assets text[] := ARRAY[]::text[];
    l_amounts bigint[] := ARRAY[]::bigint[];
    l_details text[] := ARRAY[]::text[];
    l_prevs text[] := ARRAY[]::text[];
    l_hashes text[] := ARRAY[]::text[];
BEGIN
    -- Aggregates over one function scan see its rows in order: no sort needed.
    SELECT count(*), array_agg(t ->> 0), array_agg((t ->> 1)::bigint),
           array_agg((t ->> 2)::bigint), array_agg((t ->> 3)::bigint), array_agg(t ->> 4),
           array_agg(t ->> 5), array_agg(t ->> 6), array_agg(t ->> 7), array_agg(t ->> 8)
    INTO n, p_keys, p_debits, p_credits, p_amounts, p_codes, p_ref_types, p_ref_ids, p_streams,
         p_details_heads
    FROM json_array_elements(p_transfers::json) AS e (t);

    IF EXISTS (SELECT 1 FROM ledger_transfers t WHERE t.idempotency_key = ANY (p_keys)) THEN
        RETURN QUERY SELECT * FROM escrowd_post_existing(
            p_keys, p_debits, p_credits, p_amounts, p_codes, p_ref_types, p_ref_ids);
        RETURN;
    END IF;

    -- One primary-key probe per account. A set-based lookup lets the planner hash-join
    -- against a scan of the whole table, which grows with the number of accounts.
    a_ids := ARRAY(SELECT DISTINCT x FROM unnest(p_debits || p_credits) AS x ORDER BY x);
    a_kinds := array_fill(NULL::text, ARRAY[cardinality(a_ids)]);
    a_owners := a_kinds;
    a_assets := a_kinds;
    a_no_overdraft := array_fill(NULL::boolean, ARRAY[cardinality(a_ids)]);
    FOR j IN 1..cardinality(a_ids) LOOP
        SELECT l.kind, l.owner, l.asset, l.no_overdraft
        INTO r_kind, r_owner, r_asset, r_no_overdraft
        FROM ledger_accounts l WHERE l.id = a_ids[j];
        IF NOT FOUND THEN
            v_missing := coalesce(v_missing, a_ids[j]);
        END IF;
        a_kinds[j] := r_kind;
        a_owners[j] := r_owner;
        a_assets[j] := r_asset;
        a_no_overdraft[j] := r_no_overdraft;
    END LOOP;
    -- Unknown accounts (the lowest id) are reported before the first asset mismatch.
    FOR i IN 1..n LOOP
        EXIT WHEN v_missing IS NOT NULL;
        d := array_position(a_ids, p_debits[i]);
        c := array_position(a_ids, p_credits[i]);
        IF v_mismatch IS NULL AND a_assets[d] <> a_assets[c] THEN
            v_mismatch := format(
                'cannot move %s from account %s into %s account %s: both sides of a transfer '
                'must hold the same asset', a_assets[d], a_ids[d], a_assets[c], a_ids[c]);
        ELSE
            v_assets := v_assets || a_assets[d];
        END IF;
    END LOOP;
    IF v_missing IS NOT NULL THEN
        RETURN QUERY SELECT 'unknown_account'::text,
            format('no ledger account with id %s', v_missing), NULL::bigint, NULL::text, NULL::text;
        RETURN;
    END IF;
    IF v_mismatch IS NOT NULL THEN
        RETURN QUERY SELECT 'asset_mismatch'::text, v_mismatch, NULL::bigint, NULL::text,
            NULL::text;
        RETURN;
    END IF;

    -- Everything below writes; a refusal rolls back this block's subtransaction only, so the
    -- caller's transaction stays usable, like the savepoint of the Python path.
    BEGIN
        -- Ascending id order: concurrent postings lock shared accounts in the same order.
        FOR j IN 1..cardinality(a_ids) LOOP
            CONTINUE WHEN NOT a_no_overdraft[j];
            v_debit_total := 0;
            v_credit_total := 0;
            FOR i IN 1..n LOOP
                IF p_debits[i] = a_ids[j] THEN
                    v_debit_total := v_debit_total + p_amounts[i];
                END IF;
                IF p_credits[i] = a_ids[j] THEN
                    v_credit_total := v_credit_total + p_amounts[i];
                END IF;
            END LOOP;
            UPDATE ledger_accounts
            SET debits_posted = debits_posted + v_debit_total,
                credits_posted = credits_posted + v_credit_total
            WHERE id = a_ids[j]
              AND credits_posted + v_credit_total - debits_posted >= v_debit_total;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'EL001', MESSAGE = format(
                    'account %s (%s %s %s) cannot cover %s base units', a_ids[j], a_kinds[j],
                    a_owners[j], a_assets[j], v_debit_total - v_credit_total);
            END IF;
        END LOOP;

        FOR i IN 1..n LOOP
            INSERT INTO ledger_transfers (idempotency_key, debit_account_id, credit_account_id,
                asset, amount, code, ref_type, ref_id, batch_id, created_at)
            VALUES (p_keys[i], p_debits[i], p_credits[i], v_assets[i], p_amounts[i], p_codes[i],
                p_ref_types[i], p_ref_ids[i], p_batch_id, p_created_at)
            RETURNING id INTO v_id;
            v_ids := v_ids || v_id;
        END LOOP;

        -- Streams in code point order (the Python path's sorted()), so head locks are taken
        -- in the same order by both paths.
        IF p_streams[1] = ALL (p_streams) THEN
            v_streams := p_streams[1:1];
        ELSE
            SELECT array_agg(u.s) INTO v_streams FROM (
                SELECT s FROM unnest(p_streams) AS s GROUP BY s ORDER BY s COLLATE "C"
            ) AS u;
        END IF;
        FOREACH v_stream IN ARRAY v_streams LOOP
            INSERT INTO audit_heads AS h (stream, seq, row_hash)
            VALUES (v_stream, 0, repeat('0', 64))
            ON CONFLICT (stream) DO UPDATE SET seq = h.seq
            RETURNING h.seq, h.row_hash INTO v_seq, v_prev;
            FOR i IN 1..n LOOP
                CONTINUE WHEN p_streams[i] <> v_stream;
                v_seq := v_seq + 1;
                v_details := p_details_heads[i] || v_ids[i]::text || '}';
                l_streams := l_streams || v_stream;
                l_seqs := l_seqs || v_seq;
                l_actions := l_actions || ('ledger_' || p_codes[i]);
                l_assets := l_assets || v_assets[i];
                l_amounts := l_amounts || p_amounts[i];
                l_details := l_details || v_details;
                l_prevs := l_prevs || v_prev;
                v_prev := encode(sha256(convert_to(
                    escrowd_netstring(v_stream) || escrowd_netstring(v_seq::text)
                    || escrowd_netstring(p_actor) || escrowd_netstring('ledger_' || p_codes[i])
                    || escrowd_netstring(v_assets[i]) || escrowd_netstring(p_amounts[i]::text)
                    || escrowd_netstring(v_details) || escrowd_netstring(p_created_text)
                    || escrowd_netstring(v_prev), 'UTF8')), 'hex');
                l_hashes := l_hashes || v_prev;
            END LOOP;
            UPDATE audit_heads SET seq = v_seq, row_hash = v_prev WHERE stream = v_stream;
        END LOOP;
        INSERT INTO audit_log (stream, seq, actor, action, asset, amount, details, created_at,
            prev_hash, row_hash)
        SELECT u.stream, u.seq, p_actor, u.action, u.asset, u.amount, u.details, p_created_at,
               u.prev, u.hash
        FROM unnest(l_streams, l_seqs, l_actions, l_assets, l_amounts, l_details, l_prevs,
                    l_hashes) AS u (stream, seq, action, asset, amount, details, prev, hash);

        RETURN QUERY SELECT 'posted'::text, NULL::text, u.id, u.asset, p_batch_id
            FROM unnest(v_ids, v_assets) AS u (id, asset);
    EXCEPTION
        WHEN SQLSTATE 'EL001' THEN
            RETURN QUERY SELECT 'insufficient_funds'::text, SQLERRM, NULL::bigint, NULL::text,
                NULL::text;
        WHEN unique_violation THEN
            -- A concurrent posting of the same keys committed between our check and insert.
            GET STACKED DIAGNOSTICS v_constraint = CONSTRAINT_NAME;
            IF v_constraint <> 'uq_ledger_transfers_idempotency_key' THEN
                RAISE;
            END IF;
            RETURN QUERY SELECT * FROM escrowd_post_existing(
                p_keys, p_debits, p_credits, p_amounts, p_codes, p_ref_types, p_ref_ids);
            IF NOT FOUND THEN
                RAISE;
            END IF;
    END;
END;
$$;
"""
DROP_POSTING_FUNCTIONS = (
    "DROP FUNCTION IF EXISTS escrowd_post(text, text, text, timestamptz, text)",
    "DROP FUNCTION IF EXISTS escrowd_post_existing(text[], bigint[], bigint[], bigint[], text[],"
    " text[], text[])",
    "DROP FUNCTION IF EXISTS escrowd_netstring(text)",
)


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("external_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
        sa.UniqueConstraint("external_id", name=op.f("uq_agents_external_id")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("key_hash", sa.String(length=128), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", models_base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", models_base.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "scope IN ('read', 'write', 'admin')", name=op.f("ck_api_keys_scope_valid")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_table(
        "assets",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("symbol", sa.String(length=16), nullable=False),
        sa.Column("decimals", sa.Integer(), nullable=False),
        sa.Column("token_address", sa.String(length=64), nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "decimals >= 0 AND decimals <= 36", name=op.f("ck_assets_decimals_range")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assets")),
        sa.UniqueConstraint("chain", "symbol", name=op.f("uq_assets_chain_symbol")),
    )
    op.create_table(
        "audit_heads",
        sa.Column("stream", sa.String(length=160), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("row_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("stream", name=op.f("pk_audit_heads")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("stream", sa.String(length=160), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("asset", sa.String(length=16), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("row_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
        sa.UniqueConstraint("stream", "seq", name=op.f("uq_audit_log_stream_seq")),
    )
    op.create_table(
        "chain_blocks",
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("block_number", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("block_hash", sa.String(length=100), nullable=False),
        sa.Column("parent_hash", sa.String(length=100), nullable=False),
        sa.PrimaryKeyConstraint("chain", "block_number", name=op.f("pk_chain_blocks")),
    )
    op.create_table(
        "chain_cursors",
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.Column("block_hash", sa.String(length=100), nullable=True),
        sa.Column("signature", sa.String(length=100), nullable=True),
        sa.Column("updated_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chain", "key", name=op.f("pk_chain_cursors")),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("principal", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("path", sa.String(length=500), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=False),
        sa.Column("response_body", sa.Text(), nullable=False),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("principal", "key", name=op.f("uq_idempotency_keys_principal_key")),
    )
    op.create_table(
        "ledger_accounts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=False),
        sa.Column("asset", sa.String(length=16), nullable=False),
        sa.Column("no_overdraft", sa.Boolean(), nullable=False),
        sa.Column("debits_posted", sa.BigInteger(), nullable=False),
        sa.Column("credits_posted", sa.BigInteger(), nullable=False),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('agent_available', 'escrow', 'platform_fees', 'custody', 'payouts_in_flight', 'general')",
            name=op.f("ck_ledger_accounts_kind_valid"),
        ),
        sa.CheckConstraint(
            "NOT no_overdraft OR credits_posted >= debits_posted",
            name=op.f("ck_ledger_accounts_no_overdraft_holds"),
        ),
        sa.CheckConstraint(
            "debits_posted >= 0 AND credits_posted >= 0",
            name=op.f("ck_ledger_accounts_totals_nonnegative"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_accounts")),
        sa.UniqueConstraint(
            "kind", "owner", "asset", name=op.f("uq_ledger_accounts_kind_owner_asset")
        ),
    )
    op.create_table(
        "sender_nonces",
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("next_nonce", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("chain", "address", name=op.f("pk_sender_nonces")),
    )
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("secret_ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("event_types", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("disabled_reason", sa.String(length=500), nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", models_base.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("api_version", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("fanned_out", sa.Boolean(), nullable=False),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
    )
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_webhook_events_fanned_out"), ["fanned_out"], unique=False
        )

    op.create_table(
        "deposit_addresses",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("agent_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("derivation_index", sa.Integer(), nullable=False),
        sa.Column("token_account", sa.String(length=64), nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "derivation_index >= 0", name=op.f("ck_deposit_addresses_derivation_index_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_deposit_addresses_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deposit_addresses")),
        sa.UniqueConstraint("agent_id", "chain", name=op.f("uq_deposit_addresses_agent_id_chain")),
        sa.UniqueConstraint("chain", "address", name=op.f("uq_deposit_addresses_chain_address")),
        sa.UniqueConstraint(
            "chain", "derivation_index", name=op.f("uq_deposit_addresses_chain_derivation_index")
        ),
    )
    with op.batch_alter_table("deposit_addresses", schema=None) as batch_op:
        batch_op.create_index("ix_deposit_addresses_chain_id", ["chain", "id"], unique=False)

    op.create_table(
        "escrows",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.String(length=128), nullable=False),
        sa.Column(
            "buyer_agent_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "worker_agent_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("asset", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("fee_bps", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("worker_amount", sa.BigInteger(), nullable=True),
        sa.Column("fee_amount", sa.BigInteger(), nullable=True),
        sa.Column("refund_amount", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", models_base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", models_base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("payout_tx_hash", sa.String(length=100), nullable=True),
        sa.Column("refund_tx_hash", sa.String(length=100), nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('funded', 'released', 'refunded', 'resolved', 'expired')",
            name=op.f("ck_escrows_status_valid"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_escrows_amount_positive")),
        sa.CheckConstraint(
            "buyer_agent_id <> worker_agent_id", name=op.f("ck_escrows_distinct_parties")
        ),
        sa.CheckConstraint(
            "fee_bps >= 0 AND fee_bps <= 10000", name=op.f("ck_escrows_fee_bps_range")
        ),
        sa.ForeignKeyConstraint(
            ["buyer_agent_id"], ["agents.id"], name=op.f("fk_escrows_buyer_agent_id_agents")
        ),
        sa.ForeignKeyConstraint(
            ["worker_agent_id"], ["agents.id"], name=op.f("fk_escrows_worker_agent_id_agents")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_escrows")),
        sa.UniqueConstraint("job_id", name=op.f("uq_escrows_job_id")),
    )
    with op.batch_alter_table("escrows", schema=None) as batch_op:
        batch_op.create_index(
            "ix_escrows_status_expires_at", ["status", "expires_at"], unique=False
        )

    op.create_table(
        "ledger_transfers",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("idempotency_key", sa.String(length=160), nullable=False),
        sa.Column(
            "debit_account_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "credit_account_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column("asset", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("ref_type", sa.String(length=32), nullable=False),
        sa.Column("ref_id", sa.String(length=128), nullable=False),
        sa.Column("batch_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "code IN ('deposit', 'deposit_reversal', 'escrow_fund', 'escrow_release', 'fee', 'refund', 'payout_hold', 'payout', 'payout_reversal', 'adjustment')",
            name=op.f("ck_ledger_transfers_code_valid"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_ledger_transfers_amount_positive")),
        sa.CheckConstraint(
            "debit_account_id <> credit_account_id",
            name=op.f("ck_ledger_transfers_distinct_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["credit_account_id"],
            ["ledger_accounts.id"],
            name=op.f("fk_ledger_transfers_credit_account_id_ledger_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["debit_account_id"],
            ["ledger_accounts.id"],
            name=op.f("fk_ledger_transfers_debit_account_id_ledger_accounts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_transfers")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_ledger_transfers_idempotency_key")),
    )
    with op.batch_alter_table("ledger_transfers", schema=None) as batch_op:
        batch_op.create_index("ix_ledger_transfers_credit", ["credit_account_id"], unique=False)
        batch_op.create_index("ix_ledger_transfers_debit", ["debit_account_id"], unique=False)
        batch_op.create_index("ix_ledger_transfers_ref", ["ref_type", "ref_id"], unique=False)

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "endpoint_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("delivered_at", models_base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'delivered', 'failed')",
            name=op.f("ck_webhook_deliveries_status_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_deliveries_endpoint_id_webhook_endpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["webhook_events.id"],
            name=op.f("fk_webhook_deliveries_event_id_webhook_events"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint(
            "endpoint_id", "event_id", name=op.f("uq_webhook_deliveries_endpoint_id_event_id")
        ),
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_webhook_deliveries_endpoint_status_id",
            ["endpoint_id", "status", "id"],
            unique=False,
        )
        batch_op.create_index(
            "ix_webhook_deliveries_status_next_attempt", ["status", "next_attempt_at"], unique=False
        )

    op.create_table(
        "deposits",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("tx_hash", sa.String(length=100), nullable=False),
        sa.Column("log_index", sa.Integer(), nullable=False),
        sa.Column("asset_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("agent_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "deposit_address_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column("from_address", sa.String(length=64), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("block_hash", sa.String(length=100), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("credited", sa.Boolean(), nullable=False),
        sa.Column("reversed", sa.Boolean(), nullable=False),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'confirmed', 'orphaned')", name=op.f("ck_deposits_status_valid")
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_deposits_amount_positive")),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_deposits_agent_id_agents")
        ),
        sa.ForeignKeyConstraint(
            ["asset_id"], ["assets.id"], name=op.f("fk_deposits_asset_id_assets")
        ),
        sa.ForeignKeyConstraint(
            ["deposit_address_id"],
            ["deposit_addresses.id"],
            name=op.f("fk_deposits_deposit_address_id_deposit_addresses"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deposits")),
        sa.UniqueConstraint(
            "chain", "tx_hash", "log_index", name=op.f("uq_deposits_chain_tx_hash_log_index")
        ),
    )
    with op.batch_alter_table("deposits", schema=None) as batch_op:
        batch_op.create_index("ix_deposits_agent_id_id", ["agent_id", "id"], unique=False)
        batch_op.create_index(
            "ix_deposits_chain_status_block", ["chain", "status", "block_number"], unique=False
        )

    op.create_table(
        "payouts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("idempotency_key", sa.String(length=160), nullable=False),
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("asset_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("agent_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("escrow_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("source_address", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("claimed_until", models_base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("nonce", sa.BigInteger(), nullable=True),
        sa.Column("tx_hash", sa.String(length=100), nullable=True),
        sa.Column("raw_tx", sa.LargeBinary(), nullable=True),
        sa.Column("max_fee_per_gas", sa.BigInteger(), nullable=True),
        sa.Column("last_valid_block_height", sa.BigInteger(), nullable=True),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("broadcast_at", models_base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("confirmed_at", models_base.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "reason IN ('release', 'refund', 'withdrawal', 'sweep')",
            name=op.f("ck_payouts_reason_valid"),
        ),
        sa.CheckConstraint(
            "status IN ('requested', 'signed', 'broadcast', 'confirmed', 'failed')",
            name=op.f("ck_payouts_status_valid"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_payouts_amount_positive")),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_payouts_agent_id_agents")
        ),
        sa.ForeignKeyConstraint(
            ["asset_id"], ["assets.id"], name=op.f("fk_payouts_asset_id_assets")
        ),
        sa.ForeignKeyConstraint(
            ["escrow_id"], ["escrows.id"], name=op.f("fk_payouts_escrow_id_escrows")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payouts")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_payouts_idempotency_key")),
    )
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.create_index("ix_payouts_status_chain", ["status", "chain"], unique=False)

    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "delivery_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_attempts_delivery_id_webhook_deliveries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    with op.batch_alter_table("webhook_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_webhook_attempts_delivery_id"), ["delivery_id"], unique=False
        )

    op.create_table(
        "payout_transactions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "payout_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("tx_hash", sa.String(length=100), nullable=False),
        sa.Column("raw_tx", sa.LargeBinary(), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=True),
        sa.Column("max_fee_per_gas", sa.BigInteger(), nullable=True),
        sa.Column("last_valid_block_height", sa.BigInteger(), nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["payout_id"], ["payouts.id"], name=op.f("fk_payout_transactions_payout_id_payouts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payout_transactions")),
        sa.UniqueConstraint("tx_hash", name=op.f("uq_payout_transactions_tx_hash")),
    )
    with op.batch_alter_table("payout_transactions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_payout_transactions_payout_id"), ["payout_id"], unique=False
        )

    if op.get_bind().dialect.name == "postgresql":
        # The audit trail is append-only: the database itself refuses edits and deletions.
        op.execute(
            """
            CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
                    USING ERRCODE = 'insufficient_privilege';
            END;
            $$
            """
        )
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change()"
        )
        op.execute(
            "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change()"
        )
        op.execute(POSTING_FUNCTIONS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in DROP_POSTING_FUNCTIONS:
            op.execute(statement)
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_refuse_change()")
    with op.batch_alter_table("payout_transactions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payout_transactions_payout_id"))

    op.drop_table("payout_transactions")
    with op.batch_alter_table("webhook_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_attempts_delivery_id"))

    op.drop_table("webhook_attempts")
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.drop_index("ix_payouts_status_chain")

    op.drop_table("payouts")
    with op.batch_alter_table("deposits", schema=None) as batch_op:
        batch_op.drop_index("ix_deposits_chain_status_block")
        batch_op.drop_index("ix_deposits_agent_id_id")

    op.drop_table("deposits")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_status_next_attempt")
        batch_op.drop_index("ix_webhook_deliveries_endpoint_status_id")

    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("ledger_transfers", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_transfers_ref")
        batch_op.drop_index("ix_ledger_transfers_debit")
        batch_op.drop_index("ix_ledger_transfers_credit")

    op.drop_table("ledger_transfers")
    with op.batch_alter_table("escrows", schema=None) as batch_op:
        batch_op.drop_index("ix_escrows_status_expires_at")

    op.drop_table("escrows")
    with op.batch_alter_table("deposit_addresses", schema=None) as batch_op:
        batch_op.drop_index("ix_deposit_addresses_chain_id")

    op.drop_table("deposit_addresses")
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_events_fanned_out"))

    op.drop_table("webhook_events")
    op.drop_table("webhook_endpoints")
    op.drop_table("sender_nonces")
    op.drop_table("ledger_accounts")
    op.drop_table("idempotency_keys")
    op.drop_table("chain_cursors")
    op.drop_table("chain_blocks")
    op.drop_table("audit_log")
    op.drop_table("audit_heads")
    op.drop_table("assets")
    op.drop_table("api_keys")
    op.drop_table("agents")
