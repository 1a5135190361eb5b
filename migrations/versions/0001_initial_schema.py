"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.base

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("external_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", models.base.UTCDateTime(timezone=True), nullable=True),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("updated_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("api_version", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("fanned_out", sa.Boolean(), nullable=False),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("expires_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("payout_tx_hash", sa.String(length=100), nullable=True),
        sa.Column("refund_tx_hash", sa.String(length=100), nullable=True),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("next_attempt_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("delivered_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("claimed_until", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("nonce", sa.BigInteger(), nullable=True),
        sa.Column("tx_hash", sa.String(length=100), nullable=True),
        sa.Column("raw_tx", sa.LargeBinary(), nullable=True),
        sa.Column("max_fee_per_gas", sa.BigInteger(), nullable=True),
        sa.Column("last_valid_block_height", sa.BigInteger(), nullable=True),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models.base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("broadcast_at", models.base.UTCDateTime(timezone=True), nullable=True),
        sa.Column("confirmed_at", models.base.UTCDateTime(timezone=True), nullable=True),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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
        sa.Column("created_at", models.base.UTCDateTime(timezone=True), nullable=False),
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


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
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
