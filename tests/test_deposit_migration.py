"""Migration 0008 on a database holding deposits: each keeps its amount and takes the credit
state its old flags imply; afterwards amounts past BIGINT are stored exactly."""

from __future__ import annotations

from sqlalchemy import Engine, select, text

from escrowd.migrations.runner import upgrade_to, upgrade_to_head
from escrowd.models import Deposit
from escrowd.models.db import make_session_factory

# (status, credited, reversed) -> (credit_state, credited_base_units) after the upgrade.
CASES = {
    ("pending", False, False): ("none", 0),
    ("confirmed", True, False): ("credited", 5_000_000),
    ("orphaned", True, True): ("reversed", 0),
    ("orphaned", True, False): ("reversal_short", 5_000_000),
    ("orphaned", False, False): ("none", 0),
}


def test_existing_deposits_keep_their_amounts_and_get_their_credit_state(
    empty_engine: Engine,
) -> None:
    upgrade_to(empty_engine, "0005")
    with empty_engine.begin() as conn:
        conn.execute(
            text("INSERT INTO agents (id, external_id, created_at) VALUES (1, 'a', :t)"),
            {"t": "2026-01-01"},
        )
        conn.execute(
            text(
                "INSERT INTO deposit_addresses (id, agent_id, chain, address, derivation_index, "
                "created_at) VALUES (1, 1, 'evm', '0x01', 0, :t)"
            ),
            {"t": "2026-01-01"},
        )
        conn.execute(
            text(
                "INSERT INTO assets (id, chain, symbol, decimals, created_at) "
                "VALUES (1, 'base', 'USDC', 6, :t)"
            ),
            {"t": "2026-01-01"},
        )
        for n, (status, credited, reversed_) in enumerate(CASES):
            conn.execute(
                text(
                    "INSERT INTO deposits (chain, tx_hash, log_index, asset_id, agent_id, "
                    "deposit_address_id, amount, block_number, block_hash, status, credited, "
                    "reversed, created_at, updated_at) VALUES ('base', :tx, 0, 1, 1, 1, "
                    "5000000, 7, '0x07', :status, :credited, :reversed, :t, :t)"
                ),
                {
                    "tx": f"0x{n:02x}",
                    "status": status,
                    "credited": credited,
                    "reversed": reversed_,
                    "t": "2026-01-01",
                },
            )
    upgrade_to_head(empty_engine)
    sessions = make_session_factory(empty_engine)
    with sessions() as s, s.begin():
        rows = s.scalars(select(Deposit).order_by(Deposit.id)).all()
        got = {
            (d.status, d.credited, d.reversed): (d.credit_state, d.credited_base_units)
            for d in rows
        }
        assert got == CASES
        assert {d.amount for d in rows} == {5_000_000}
        rows[0].amount = 2**256 - 1
    with sessions() as s:
        assert s.scalar(select(Deposit.amount).where(Deposit.id == rows[0].id)) == 2**256 - 1
