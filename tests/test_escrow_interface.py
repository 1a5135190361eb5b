"""EscrowService and AsyncEscrowService return plain values and raise the API's errors,
on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from sqlalchemy import Engine

from escrowd.escrow import AsyncEscrowService, EscrowService
from escrowd.escrow.errors import AgentNotFound, EscrowConflict, InsufficientFunds
from escrowd.escrow.values import Balance, Escrow
from escrowd.models.db import make_session_factory
from tests.escrow_fixtures import PLATFORM, available, ledger_clean, make_settings, seed_agents

USDC = 10**6


def test_values_are_frozen_and_name_the_parties(engine: Engine, tmp_path: Path) -> None:
    sessions = make_session_factory(engine)
    ids = seed_agents(sessions, "buyer", "worker", balance=10 * USDC)
    first = EscrowService(engine, make_settings(tmp_path))
    funded = first.fund_escrow(
        job_id="job-v", buyer="buyer", worker="worker", asset="USDC", amount=4 * USDC
    )
    assert isinstance(funded, Escrow) and not hasattr(funded, "_sa_instance_state")
    with pytest.raises(dataclasses.FrozenInstanceError):
        funded.status = "released"  # type: ignore[misc]

    # A process that never saw these agents names them from the database.
    fresh = EscrowService(engine, make_settings(tmp_path))
    released = fresh.release_escrow("job-v")

    assert (released.buyer, released.worker, released.status) == ("buyer", "worker", "released")
    assert released.worker_amount_base_units == 3_900_000
    assert released.fee_amount_base_units == 100_000
    assert released.created_at == funded.created_at
    assert fresh.get_escrow("job-v") == released
    assert fresh.get_agent("buyer").id == "buyer"
    assert fresh.balances("worker") == [Balance("USDC", 6, 13_900_000, 0)]  # 10 seeded
    assert available(sessions, ids["buyer"]) == 6 * USDC
    first.close()
    fresh.close()


def test_async_service_runs_the_same_calls(engine: Engine, tmp_path: Path) -> None:
    sessions = make_session_factory(engine)
    seed_agents(sessions, "buyer", "worker", balance=10 * USDC)
    url = engine.url.render_as_string(hide_password=False)

    async def scenario() -> list[Escrow]:
        escrows = AsyncEscrowService.from_url(
            url, make_settings(tmp_path), platform=PLATFORM, max_workers=4
        )
        try:
            funded = await asyncio.gather(
                *(
                    escrows.fund_escrow(
                        job_id=f"job-{n}",
                        buyer="buyer",
                        worker="worker",
                        asset="USDC",
                        amount=2 * USDC,
                    )
                    for n in range(4)
                )
            )
            with pytest.raises(InsufficientFunds):
                await escrows.fund_escrow(
                    job_id="job-big",
                    buyer="buyer",
                    worker="worker",
                    asset="USDC",
                    amount=3 * USDC,
                )
            with pytest.raises(AgentNotFound):
                await escrows.balances("nobody")
            await escrows.release_escrow("job-0")
            with pytest.raises(EscrowConflict):
                await escrows.release_escrow("job-0")
            refunded = await escrows.refund_escrow("job-1")
            assert refunded.refund_amount_base_units == 2 * USDC
            resolved = await escrows.resolve_escrow("job-2", USDC)
            assert resolved.refund_amount_base_units == USDC
            [balance] = await escrows.balances("buyer")
            assert balance.available_base_units == 2 * USDC + 2 * USDC + USDC
            assert balance.escrowed_as_buyer_base_units == 2 * USDC
            return list(funded)
        finally:
            await escrows.aclose()

    funded = asyncio.run(scenario())
    assert sorted(e.job_id for e in funded) == [f"job-{n}" for n in range(4)]
    assert all(e.status == "funded" and e.buyer == "buyer" for e in funded)
    assert ledger_clean(sessions)
