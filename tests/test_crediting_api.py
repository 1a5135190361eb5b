"""What the API shows of deposits on tokens with other decimals than the ledger's, and of a
deposit whose reversal fell short: each deposit's amount in its token's units, its credit
and state; balances at the ledger's one scale."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import accounts, ledger, service
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.sink import Finalized
from escrowd.indexer.store import FoundDeposit, Watched, record_deposits
from escrowd.models import AccountKind, ApiScope, Chain, Deposit, DepositAddress, TransferCode
from escrowd.models.registry import ensure_asset
from tests.escrow_fixtures import make_client, make_key


def _found(watched: Watched, asset_id: int, n: int, amount: int) -> FoundDeposit:
    return FoundDeposit(f"0x{n:064x}", 0, asset_id, watched, None, amount, 7, "0x" + "07" * 32)


def test_deposits_and_balances_over_http_show_each_credit(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    sink = LedgerDepositSink()
    with sessions() as s, s.begin():
        base = ensure_asset(s, chain="base", symbol="USDC", decimals=6, token_address=None)
        bsc = ensure_asset(s, chain="bsc", symbol="USDC", decimals=18, token_address=None)
        agent = service.register_agent(s, "alice")
        address = DepositAddress(
            agent_id=agent.id, chain=Chain.EVM, address="0x" + "0a" * 20, derivation_index=0
        )
        s.add(address)
        s.flush()
        watched = Watched(address.id, agent.id, address.address, None)
        record_deposits(s, "base", [_found(watched, base.id, 1, 4_000_000)], sink)
        record_deposits(s, "bsc", [_found(watched, bsc.id, 2, 10**18 + 1)], sink)
    with sessions() as s, s.begin():
        final = [Finalized(d.id, d.block_hash) for d in s.scalars(select(Deposit))]
        assert sink.confirmed_many(s, final) == 2
    client = make_client(engine, tmp_path)
    auth = {"Authorization": f"Bearer {make_key(sessions, ApiScope.READ)}"}
    balances = client.get("/v1/agents/alice/balances", headers=auth).json()["balances"]
    # 4 + 1 USDC credited (the 18-decimal token's extra unit is dust), shown at the ledger's
    # 6 decimals whatever the token's.
    assert [(b["asset"], b["decimals"], b["available"]) for b in balances] == [("USDC", 6, "5")]

    # 3 of the 5 USDC are spent, then a deep reorg takes the 4 deposited on base: the
    # reversal takes the 2 left and falls short by 2.
    with sessions() as s, s.begin():
        ledger.post(
            s,
            [
                ledger.TransferSpec(
                    "spend",
                    accounts.agent_available(s, agent.id, "USDC").id,
                    ledger.get_or_create_account(s, AccountKind.GENERAL, "x", "USDC").id,
                    3_000_000,
                    TransferCode.ADJUSTMENT,
                    "test",
                    "spend",
                )
            ],
            actor="test",
        )
        orphan = s.scalars(select(Deposit).where(Deposit.chain == "base").with_for_update()).one()
        sink.orphaned(s, orphan)

    listed = client.get("/v1/deposits", params={"agent": "alice"}, headers=auth).json()["data"]
    got = [
        (
            d["chain"],
            d["amount"],
            d["amount_base_units"],
            d["status"],
            d["credit_state"],
            d["credited_base_units"],
            d["reversal_shortfall_base_units"],
            d["dust_base_units"],
        )
        for d in listed
    ]
    assert got == [
        ("base", "4", "4000000", "orphaned", "reversal_short", "2000000", "2000000", "0"),
        (
            "bsc",
            "1.000000000000000001",
            str(10**18 + 1),
            "confirmed",
            "credited",
            "1000000",
            "0",
            "1",
        ),
    ]
    assert "short by 2000000" in listed[0]["credit_note"]
