"""Escrows priced in SOL (seed 004 prices tasks in SOL) beside USDC ones: in lamports
in-process, in SOL decimal strings over HTTP, fees included, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import accounts, ledger
from escrowd.escrow.interface import EscrowService
from escrowd.models import ApiScope, TransferCode
from escrowd.models.registry import ensure_asset
from tests.escrow_fixtures import (
    available,
    credit,
    ledger_clean,
    make_client,
    make_key,
    make_settings,
    platform_fees,
    seed_agents,
)

SOL = 10**9


def credit_sol(sessions: sessionmaker[Session], agent_id: int, lamports: int) -> None:
    """As a finalized SOL deposit on Solana would."""
    with sessions() as s, s.begin():
        ensure_asset(s, chain="solana", symbol="SOL", decimals=9, token_address=None)
        ledger.post(
            s,
            [
                ledger.TransferSpec(
                    idempotency_key=f"sol-deposit-{agent_id}-{lamports}",
                    debit_account_id=accounts.custody(s, "solana", "SOL").id,
                    credit_account_id=accounts.agent_available(s, agent_id, "SOL").id,
                    amount=lamports,
                    code=TransferCode.DEPOSIT,
                    ref_type="test",
                    ref_id=str(agent_id),
                )
            ],
            actor="test",
        )


def test_sol_escrows_in_process_and_over_http_with_fees(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    ids = seed_agents(sessions, "buyer", "worker")
    credit_sol(sessions, ids["buyer"], 5 * SOL)
    with sessions() as s, s.begin():
        credit(s, ids["buyer"], 50_000_000)  # USDC beside SOL: separate balances

    # In-process, in lamports (on PostgreSQL: the one-call database functions).
    svc = EscrowService(engine, make_settings(tmp_path))
    escrow = svc.fund_escrow(
        job_id="sol-1", buyer="buyer", worker="worker", asset="SOL", amount=1_500_000_001,
        fee_bps=250,
    )  # fmt: skip
    assert (escrow.asset, escrow.amount_base_units) == ("SOL", 1_500_000_001)
    released = svc.release_escrow("sol-1")
    # fee = floor(1_500_000_001 * 250 / 10000) = 37_500_000; the odd lamport stays the worker's.
    assert (released.worker_amount_base_units, released.fee_amount_base_units) == (
        1_462_500_001,
        37_500_000,
    )
    balances = {b.asset: b for b in svc.balances("buyer")}
    assert (balances["SOL"].decimals, balances["SOL"].available_base_units) == (9, 3_499_999_999)
    assert balances["USDC"].available_base_units == 50_000_000

    # Over HTTP, in SOL with up to 9 decimals.
    client = make_client(engine, tmp_path)
    auth = {"Authorization": f"Bearer {make_key(sessions, ApiScope.WRITE)}"}
    keys = itertools.count()

    def post(path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {**auth, "Idempotency-Key": f"sol-{next(keys)}"}
        return client.post(f"/v1{path}", json=body, headers=headers)

    def fund(job: str, amount: str) -> Any:
        body = {"job_id": job, "buyer": "buyer", "worker": "worker", "asset": "SOL",
                "amount": amount, "fee_bps": 250}  # fmt: skip
        return post("/escrows", body)

    funded = fund("sol-2", "0.123456789")
    assert funded.status_code == 201, funded.text
    assert (funded.json()["amount"], funded.json()["amount_base_units"]) == (
        "0.123456789",
        "123456789",
    )
    body = post("/escrows/sol-2/release").json()
    assert (body["worker_amount"], body["fee_amount"], body["fee_amount_base_units"]) == (
        "0.12037037",
        "0.003086419",
        "3086419",
    )
    assert fund("sol-3", "1").status_code == 201
    body = post("/escrows/sol-3/resolve", {"worker_amount": "0.5"}).json()
    assert (body["worker_amount"], body["fee_amount"], body["refund_amount"]) == (
        "0.4875",
        "0.0125",
        "0.5",
    )
    assert fund("sol-4", "0.25").status_code == 201
    assert post("/escrows/sol-4/refund").json()["refund_amount"] == "0.25"
    too_fine = fund("sol-5", "0.0000000001")
    assert (too_fine.status_code, too_fine.json()["error"]["type"]) == (400, "invalid_amount")
    too_much = fund("sol-5", "10")
    assert (too_much.status_code, too_much.json()["error"]["type"]) == (422, "insufficient_funds")

    rows = client.get("/v1/agents/buyer/balances", headers=auth).json()["balances"]
    sol = next(row for row in rows if row["asset"] == "SOL")
    # 5 - 1.500000001 - 0.123456789 - 1 + 0.5 (refunded half) = 2.87654321
    assert (sol["decimals"], sol["available"], sol["escrowed_as_buyer"]) == (
        9,
        "2.87654321",
        "0",
    )
    worker_sol = 1_462_500_001 + 120_370_370 + 487_500_000
    assert available(sessions, ids["worker"], "SOL") == worker_sol
    assert platform_fees(sessions, "SOL") == 37_500_000 + 3_086_419 + 12_500_000
    assert platform_fees(sessions, "USDC") == 0
    assert ledger_clean(sessions)
