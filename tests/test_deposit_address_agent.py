"""A deposit's agent is its deposit address's agent (migration 0022), on both databases:
the schema refuses a deposit crediting one agent for a transfer into another agent's
address, and the upgrade keeps the deposits it finds, including one an escrow was funded
from, or stops naming the rows that break the rule."""

from __future__ import annotations

import pytest
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError

from escrowd.config.errors import Conflict
from escrowd.migrations.runner import current_revision, downgrade_to, upgrade_to, upgrade_to_head

T = "2026-01-01T00:00:00+00:00"


def _two_agents(conn: Connection) -> None:
    """Agents 1 and 2 with an EVM deposit address each (address id = agent id), and USDC."""
    for n in (1, 2):
        conn.execute(
            text("INSERT INTO agents (id, external_id, created_at) VALUES (:n, :e, :t)"),
            {"n": n, "e": f"agent-{n}", "t": T},
        )
        conn.execute(
            text(
                "INSERT INTO deposit_addresses (id, agent_id, chain, address, derivation_index, "
                "created_at) VALUES (:n, :n, 'evm', :a, :n, :t)"
            ),
            {"n": n, "a": f"0x{n:040x}", "t": T},
        )
    conn.execute(
        text(
            "INSERT INTO assets (id, chain, symbol, decimals, created_at) "
            "VALUES (1, 'base', 'USDC', 6, :t)"
        ),
        {"t": T},
    )


def _deposit(conn: Connection, deposit_id: int, agent_id: int, address_id: int) -> None:
    conn.execute(
        text(
            "INSERT INTO deposits (id, chain, tx_hash, log_index, asset_id, agent_id, "
            "deposit_address_id, amount, block_number, block_hash, status, credited, reversed, "
            "created_at, updated_at) VALUES (:id, 'base', :tx, 0, 1, :agent, :address, "
            "5000000, 7, '0x07', 'confirmed', true, false, :t, :t)"
        ),
        {
            "id": deposit_id,
            "tx": f"0x{deposit_id:064x}",
            "agent": agent_id,
            "address": address_id,
            "t": T,
        },
    )


def _escrow_funded_from(conn: Connection, deposit_id: int) -> None:
    """Escrow 1, agent 1 paying agent 2, funded from the deposit."""
    conn.execute(
        text(
            "INSERT INTO escrows (id, job_id, buyer_agent_id, worker_agent_id, asset, amount, "
            "fee_bps, status, deposit_id, created_at, updated_at) "
            "VALUES (1, 'job-1', 1, 2, 'USDC', 5000000, 0, 'funded', :d, :t, :t)"
        ),
        {"d": deposit_id, "t": T},
    )


def test_a_deposit_into_another_agents_address_is_refused(engine: Engine) -> None:
    with engine.begin() as conn:
        _two_agents(conn)
        _deposit(conn, 1, 1, 1)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        _deposit(conn, 2, 2, 1)
    with pytest.raises(IntegrityError), engine.begin() as conn:
        _deposit(conn, 3, 1, 99)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT id, agent_id FROM deposits ORDER BY id")).all()
    assert [tuple(row) for row in stored] == [(1, 1)]


def test_upgrade_keeps_deposits_and_the_escrows_funded_from_them(empty_engine: Engine) -> None:
    upgrade_to(empty_engine, "0021")
    with empty_engine.begin() as conn:
        _two_agents(conn)
        _deposit(conn, 1, 1, 1)
        _deposit(conn, 2, 2, 2)
        _escrow_funded_from(conn, 1)
    upgrade_to_head(empty_engine)
    with empty_engine.connect() as conn:
        deposits = conn.execute(
            text("SELECT id, agent_id, deposit_address_id FROM deposits ORDER BY id")
        ).all()
        funded_from = conn.execute(text("SELECT deposit_id FROM escrows")).scalar_one()
    assert [tuple(row) for row in deposits] == [(1, 1, 1), (2, 2, 2)]
    assert funded_from == 1
    with pytest.raises(IntegrityError), empty_engine.begin() as conn:
        _deposit(conn, 3, 1, 2)


def test_upgrade_stops_at_a_deposit_whose_agent_is_not_its_addresses(
    empty_engine: Engine,
) -> None:
    upgrade_to(empty_engine, "0021")
    with empty_engine.begin() as conn:
        _two_agents(conn)
        _deposit(conn, 1, 1, 1)
        _deposit(conn, 2, 1, 2)
    with pytest.raises(Conflict, match=r"deposit 2 \(agent 1, address of agent 2\)"):
        upgrade_to_head(empty_engine)
    assert current_revision(empty_engine) == "0021"


def test_downgrade_and_upgrade_again_keep_the_rows(empty_engine: Engine) -> None:
    upgrade_to_head(empty_engine)
    with empty_engine.begin() as conn:
        _two_agents(conn)
        _deposit(conn, 1, 1, 1)
        _escrow_funded_from(conn, 1)
    downgrade_to(empty_engine, "0021")
    assert current_revision(empty_engine) == "0021"
    upgrade_to_head(empty_engine)
    with empty_engine.connect() as conn:
        assert conn.execute(text("SELECT agent_id FROM deposits")).scalar_one() == 1
        assert conn.execute(text("SELECT deposit_id FROM escrows")).scalar_one() == 1
