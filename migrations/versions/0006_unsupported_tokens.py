"""unsupported token deposits and their recoveries

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

Transfers of ERC-20 tokens other than a chain's USDC into deposit addresses used to be
recorded nowhere, and nothing could move them. `unsupported_deposits` records each such
Transfer log (keyed like deposits by chain, tx hash and log index); `token_recoveries`
holds an operator's sweep of one token from one deposit address, with its signed
transactions stored before they are sent. A partial unique index keeps at most one open
recovery per (chain, token, address), so two commands racing cannot both sign one.
Amounts are decimal strings: these tokens may carry any uint256 amount.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from escrowd.models import base as models_base

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "status IN ('requested', 'signed')"
# Ids and the columns referring to them: INTEGER on SQLite (its only autoincrement type).
BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "token_recoveries",
        sa.Column("id", BIGINT_PK, nullable=False),
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("token_address", sa.String(length=64), nullable=False),
        sa.Column("source_address", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column("amount_base_units", sa.String(length=78), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.String(length=128), nullable=False),
        sa.Column("gas_limit", sa.BigInteger(), nullable=False),
        sa.Column("nonce", sa.BigInteger(), nullable=True),
        sa.Column("tx_hash", sa.String(length=100), nullable=True),
        sa.Column("raw_tx", sa.LargeBinary(), nullable=True),
        sa.Column("gas_tx_hash", sa.String(length=100), nullable=True),
        sa.Column("gas_raw_tx", sa.LargeBinary(), nullable=True),
        sa.Column("block_number", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('requested', 'signed', 'confirmed', 'failed')",
            name=op.f("ck_token_recoveries_status_valid"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_token_recoveries")),
    )
    op.create_index(
        "ix_token_recoveries_open",
        "token_recoveries",
        ["chain", "token_address", "source_address"],
        unique=True,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )
    op.create_table(
        "unsupported_deposits",
        sa.Column("id", BIGINT_PK, nullable=False),
        sa.Column("chain", sa.String(length=32), nullable=False),
        sa.Column("tx_hash", sa.String(length=100), nullable=False),
        sa.Column("log_index", sa.Integer(), nullable=False),
        sa.Column("token_address", sa.String(length=64), nullable=False),
        sa.Column("agent_id", BIGINT_PK, nullable=False),
        sa.Column("deposit_address_id", BIGINT_PK, nullable=False),
        sa.Column("to_address", sa.String(length=64), nullable=False),
        sa.Column("from_address", sa.String(length=64), nullable=False),
        sa.Column("amount_base_units", sa.String(length=78), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("block_hash", sa.String(length=100), nullable=False),
        sa.Column("recovery_id", BIGINT_PK, nullable=True),
        sa.Column("created_at", models_base.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["agents.id"], name=op.f("fk_unsupported_deposits_agent_id_agents")
        ),
        sa.ForeignKeyConstraint(
            ["deposit_address_id"],
            ["deposit_addresses.id"],
            name=op.f("fk_unsupported_deposits_deposit_address_id_deposit_addresses"),
        ),
        sa.ForeignKeyConstraint(
            ["recovery_id"],
            ["token_recoveries.id"],
            name=op.f("fk_unsupported_deposits_recovery_id_token_recoveries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unsupported_deposits")),
        sa.UniqueConstraint(
            "chain",
            "tx_hash",
            "log_index",
            name=op.f("uq_unsupported_deposits_chain_tx_hash_log_index"),
        ),
    )
    op.create_index(
        "ix_unsupported_deposits_agent_id_id", "unsupported_deposits", ["agent_id", "id"]
    )
    op.create_index(
        "ix_unsupported_deposits_chain_to_address",
        "unsupported_deposits",
        ["chain", "to_address", "token_address"],
    )


def downgrade() -> None:
    op.drop_table("unsupported_deposits")
    op.drop_index("ix_token_recoveries_open", table_name="token_recoveries")
    op.drop_table("token_recoveries")
