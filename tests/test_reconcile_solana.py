"""Reconciling Solana: balances read at `finalized` until two reads agree, deposits seen
but not credited listed apart, those not yet finalized allowed either way."""

from __future__ import annotations

from pathlib import Path

from solders.keypair import Keypair
from solders.pubkey import Pubkey

from escrowd.config.settings import KeystoreSettings, Settings, SolanaSettings
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import service
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.escrow.platform_wallets import book, solana_status
from escrowd.escrow.reconcile import HotWallets, reconcile_configured
from escrowd.indexer.solana_indexer import SolanaPoller
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.allocation import allocate_deposit_address
from escrowd.wallets.keystore import create_keystore
from escrowd.wallets.secrets import Secret

SOL = 10**9


def test_solana_custody_reconciles_with_deposits_under_way(sqlite_url: str, tmp_path: Path) -> None:
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    keystore = create_keystore(tmp_path / "ks.json", Secret("pw"), scrypt_log2_n=10)
    hot = keystore.solana_hot_wallet.address
    with (
        SolanaSimulator(finalized_lag_slots=4, skip_every_slots=None) as sim,
        SolanaRpcSource([sim.url], max_rounds=1) as source,
    ):
        mint = sim.create_usdc_mint()
        settings = Settings(
            data_dir=tmp_path,
            database_url=sqlite_url,
            keystore=KeystoreSettings(path=tmp_path / "ks.json"),
            solana=SolanaSettings(rpc_urls=[sim.url], usdc_mint=str(mint)),
        )
        assert settings.solana is not None
        sim.airdrop(Pubkey.from_string(hot), 5 * SOL)
        with sessions() as s, s.begin():
            book(s, settings, chain="solana", symbol="SOL", amount="5", reference="fees",
                 withdrawal=False)  # fmt: skip
            agent = service.register_agent(s, "buyer")
            address = allocate_deposit_address(
                s, agent.id, "solana", keystore.solana_deriver(str(mint))
            ).address
        poller = SolanaPoller(settings.solana, source, sessions, LedgerDepositSink())
        wallets = HotWallets(evm="0x" + "00" * 20, solana=hot)

        def reconcile_sol() -> tuple[object, ...]:
            report = reconcile_configured(sessions, settings, wallets, solana_source=source)
            [chain] = report.chains
            assert chain.error is None, chain.error
            [sol] = [line for line in chain.lines if line.asset == "SOL"]
            return report.differences, sol, chain.uncredited

        # Finalized on chain, seen by the poller, not credited yet: listed, expected.
        sim.airdrop(Pubkey.from_string(address), 2 * SOL)
        sim.finalize_all()
        poller.poll_once()
        differences, sol, uncredited = reconcile_sol()
        assert differences == []
        assert (sol.on_chain, sol.held_by_ledger, sol.uncredited) == (7 * SOL, 5 * SOL, 2 * SOL)
        assert [(d.amount, d.agent) for d in uncredited] == [(2 * SOL, "buyer")]

        # Seen at `confirmed`, not finalized: it may or may not be in the balance read.
        sim.airdrop(Pubkey.from_string(address), 1 * SOL)
        sim.advance_slots(1)
        poller.poll_once()
        differences, sol, _ = reconcile_sol()
        assert differences == []
        assert (sol.on_chain, sol.uncredited, sol.may_have_arrived) == (7 * SOL, 2 * SOL, 1 * SOL)

        # SOL nobody booked, finalized: a real difference.
        sim.airdrop(Pubkey.from_string(hot), 3)
        sim.finalize_all()
        poller.poll_once()
        differences, sol, _ = reconcile_sol()
        assert [(d.chain, d.asset, d.difference) for d in differences] == [("solana", "SOL", 3)]

        # `escrowd wallets` for Solana: what the hot wallet holds and needs; an empty one
        # is a warning that every payout and sweep would fail.
        with sessions() as s:
            [funded] = solana_status(
                s, settings.solana, source, hot_wallet=hot, reserve_transactions=50
            )
            [empty] = solana_status(
                s, settings.solana, source, hot_wallet=str(Keypair().pubkey()),
                reserve_transactions=50,
            )  # fmt: skip
        assert [h.describe() for h in funded.holdings] == [
            "5.000000003 SOL (booked operator float 5 SOL)",
            "0 USDC (booked operator float 0 USDC)",
        ]
        assert funded.warnings == []
        assert any("rent of a recipient's USDC token account" in need for need in funded.needs)
        assert empty.warnings == [
            "no SOL: every Solana payout and sweep fails (the network refuses a fee payer "
            "without funds)"
        ]
    engine.dispose()
