"""Payouts confirmed per second on anvil and on the Solana simulator, and the time from
release (payout requested with its hold) to confirmation.

Usage (from the repo root): python -m bench.payouts [--payouts 1000] [--record]
[--only evm|solana]

One worker drives all payouts through requested -> signed -> broadcast -> confirmed
(anvil: automine, confirmation depth 1; Solana simulator: finalized, a clock thread
producing a slot every 20 ms with finalization 32 slots behind). The database is a SQLite
file, as `escrowd dev` uses. Throughput: N payouts requested up front, wall time until
all are confirmed. Latency: 20 more payouts requested one at a time on the idle worker,
seconds from the request's commit (release + hold) until the worker marks it confirmed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import requests
from eth_account import Account
from solders.keypair import Keypair
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from web3.types import Wei

from escrowd.devnet.anvil import AnvilProcess
from escrowd.devnet.evm import deploy_test_usdc, dev_accounts, web3_for_url
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import accounts, ledger, reconcile
from escrowd.escrow.payout_worker import (
    EvmPayoutChain,
    PayoutWorker,
    SolanaPayoutChain,
    WorkerOptions,
)
from escrowd.escrow.payouts import PlatformAddresses, request_payout
from escrowd.indexer.evm_sender import EvmSender
from escrowd.indexer.evm_source import JsonRpcEvmSource
from escrowd.indexer.solana_sender import SolanaSender
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import Payout, PayoutReason, TransferCode
from escrowd.models.db import make_engine, make_session_factory
from escrowd.models.registry import ensure_asset
from escrowd.wallets.keystore import create_keystore
from escrowd.wallets.secrets import Secret

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# Payouts requested one at a time on an idle worker, for release -> confirmation latency.
LATENCY_PROBES = 20


def _latency(
    sessions: sessionmaker[Session],
    worker: PayoutWorker,
    *,
    chain: str,
    family: str,
    destinations: list[str],
) -> list[float]:
    """Request one payout, run the worker until it is confirmed; seconds each."""
    latencies = []
    for i, destination in enumerate(destinations):
        start = time.perf_counter()
        with sessions() as s, s.begin():
            payout_id = request_payout(
                s,
                chain=chain,
                family=family,
                asset_symbol="USDC",
                agent_id=1,
                destination=destination,
                amount=1_000_000,
                reason=PayoutReason.WITHDRAWAL,
                reference=f"probe-{i}",
                idempotency_key=f"probe-{i}",
                min_amount_base_units=1,
                platform=PlatformAddresses(),
            ).id
        while True:
            worker.run_once()
            with sessions() as s:
                if s.get(Payout, payout_id).status == "confirmed":  # type: ignore[union-attr]
                    break
            time.sleep(0.01)
        latencies.append(time.perf_counter() - start)
    return latencies


def _fresh_db(tmp: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp / 'bench.db'}")
    upgrade_to_head(engine)
    return make_session_factory(engine)


def _request_all(
    sessions: sessionmaker[Session],
    *,
    chain: str,
    family: str,
    asset: str,
    destinations: list[str],
    amount: int,
) -> None:
    with sessions() as s, s.begin():
        agent_account = accounts.agent_available(s, 1, asset)
        ledger.post(
            s,
            [
                ledger.TransferSpec(
                    idempotency_key="bench-deposit",
                    debit_account_id=accounts.custody(s, chain, asset).id,
                    credit_account_id=agent_account.id,
                    amount=amount * (len(destinations) + LATENCY_PROBES),
                    code=TransferCode.DEPOSIT,
                    ref_type="bench",
                    ref_id="1",
                )
            ],
            actor="bench",
        )
    for i, destination in enumerate(destinations):
        with sessions() as s, s.begin():
            request_payout(
                s,
                chain=chain,
                family=family,
                asset_symbol=asset,
                agent_id=1,
                destination=destination,
                amount=amount,
                reason=PayoutReason.WITHDRAWAL,
                reference=str(i),
                idempotency_key=f"bench-{i}",
                min_amount_base_units=1,
                platform=PlatformAddresses(),
            )


def _measure(
    sessions: sessionmaker[Session], worker: PayoutWorker, n: int
) -> tuple[float, list[float]]:
    start = time.perf_counter()
    worker.run_until_idle(max_passes=100_000, pause_s=0.02)
    elapsed = time.perf_counter() - start
    with sessions() as s:
        rows = s.execute(select(Payout.created_at, Payout.confirmed_at, Payout.status)).all()
    assert len(rows) == n and all(r.status == "confirmed" for r in rows), "not all confirmed"
    return elapsed, [(r.confirmed_at - r.created_at).total_seconds() for r in rows]


def _agents(sessions: sessionmaker[Session]) -> None:
    from escrowd.models import Agent

    with sessions() as s, s.begin():
        s.add(Agent(external_id="bench-agent"))


def bench_evm(n: int, tmp: Path) -> dict[str, float]:
    keystore = create_keystore(tmp / "ks.json", Secret("bench"), scrypt_log2_n=10)
    hot = keystore.evm_hot_wallet.address
    with AnvilProcess() as anvil, requests.Session() as http:
        w3 = web3_for_url(anvil.url, session=http)
        token = deploy_test_usdc(w3)
        w3.eth.send_transaction({"from": dev_accounts(w3)[0], "to": hot, "value": Wei(10**21)})
        token.mint(hot, (n + LATENCY_PROBES) * 1_000_000)
        sessions = _fresh_db(tmp)
        _agents(sessions)
        with sessions() as s, s.begin():
            ensure_asset(s, chain="anvil", symbol="USDC", decimals=6, token_address=token.address)
        destinations = [str(Account.create().address) for _ in range(n)]
        _request_all(
            sessions,
            chain="anvil",
            family="evm",
            asset="USDC",
            destinations=destinations,
            amount=1_000_000,
        )
        source = JsonRpcEvmSource([anvil.url], chain="anvil")
        sender = EvmSender(
            source,
            keystore.evm_hot_wallet,
            chain="anvil",
            chain_id=31337,
            max_fee_gwei=200,
            confirmations=1,
        )
        worker = PayoutWorker(
            sessions, EvmPayoutChain(sender), WorkerOptions(worker_id="bench", batch_limit=n)
        )
        elapsed, _ = _measure(sessions, worker, n)
        probes = [str(Account.create().address) for _ in range(LATENCY_PROBES)]
        latencies = _latency(sessions, worker, chain="anvil", family="evm", destinations=probes)
        with sessions() as s:
            lines = reconcile.reconcile_chain(
                s,
                chain="anvil",
                addresses=[hot],
                read_balance=lambda asset, addrs: sum(
                    source.erc20_balance(token.address, a) for a in addrs
                ),
            )
            assert reconcile.differences(lines) == [] and ledger.check(s) == []
    return _figures(n, elapsed, latencies)


def bench_solana(n: int, tmp: Path) -> dict[str, float]:
    keystore = create_keystore(tmp / "ks-sol.json", Secret("bench"), scrypt_log2_n=10)
    hot = keystore.solana_hot_wallet
    with SolanaSimulator(slot_ms=20) as sim:
        mint = sim.create_usdc_mint()
        sim.airdrop(hot.keypair().pubkey(), 10**12)
        sim.mint_to(mint, hot.keypair().pubkey(), (n + LATENCY_PROBES) * 1_000_000)
        sessions = _fresh_db(tmp)
        _agents(sessions)
        with sessions() as s, s.begin():
            ensure_asset(s, chain="solana", symbol="USDC", decimals=6, token_address=str(mint))
            ensure_asset(s, chain="solana", symbol="SOL", decimals=9, token_address=None)
        destinations = [str(Keypair().pubkey()) for _ in range(n)]
        _request_all(
            sessions,
            chain="solana",
            family="solana",
            asset="USDC",
            destinations=destinations,
            amount=1_000_000,
        )
        source = SolanaRpcSource([sim.url])
        worker = PayoutWorker(
            sessions,
            SolanaPayoutChain(SolanaSender(source, hot, chain="solana")),
            WorkerOptions(worker_id="bench", batch_limit=n),
        )
        elapsed, _ = _measure(sessions, worker, n)
        probes = [str(Keypair().pubkey()) for _ in range(LATENCY_PROBES)]
        latencies = _latency(sessions, worker, chain="solana", family="solana", destinations=probes)
    return _figures(n, elapsed, latencies)


def _figures(n: int, elapsed: float, latencies: list[float]) -> dict[str, float]:
    latencies.sort()
    return {
        "payouts": n,
        "seconds": elapsed,
        "per_s": n / elapsed,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payouts", type=int, default=1000)
    parser.add_argument("--only", choices=["evm", "solana"])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "evm"):
            results["anvil (EVM USDC)"] = bench_evm(args.payouts, Path(tmp))
        if args.only in (None, "solana"):
            (Path(tmp) / "bench.db").unlink(missing_ok=True)
            results["Solana simulator (SPL USDC)"] = bench_solana(args.payouts, Path(tmp))
    rows = [
        f"| {name} | {r['payouts']:.0f} | {r['seconds']:.1f} | {r['per_s']:.1f} | "
        f"{r['p50_s']:.1f} | {r['p95_s']:.1f} |"
        for name, r in results.items()
    ]
    table = "\n".join(
        [
            "| chain | payouts | wall s | confirmed/s | release->confirmed p50 s (idle) | p95 s |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    if args.record:
        load = os.getloadavg()[0]
        with RESULTS.open("a") as out:
            out.write(
                "\n## Payouts (bench/payouts.py)\n\n"
                f"Machine: 2-core python-svc ({platform.machine()}, {os.cpu_count()} CPUs), "
                f"Python {platform.python_version()}, date {dt.date(2026, 11, 23)}, 1-min load "
                f"average at the end {load:.1f} (other jobs share the box).\n\n"
                f"{table}\n"
            )


if __name__ == "__main__":
    main()
