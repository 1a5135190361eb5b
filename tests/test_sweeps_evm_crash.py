"""Crash safety of EVM sweeps: the sweeper runs as a subprocess on anvil and dies at each
step (gas funding signed, stored, broadcast; sweep signed, stored, broadcast; before it
is settled) and once by SIGKILL, with fresh deposits arriving and fees moving between
runs. The sweeper runs against one-second blocks, so a crash can leave a transaction in
the mempool, not yet mined. Restarted each time, every deposit address's USDC reaches the hot wallet
exactly once, no address sends a transaction the database does not know, and the books
agree with the chain."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from web3.types import Wei

from escrowd.devnet.anvil import REPO_ROOT
from escrowd.devnet.evm import _rpc, mine_blocks
from escrowd.escrow import service
from escrowd.escrow.payout_worker import CrashHook, SimulatedCrash
from escrowd.escrow.sweeps import CRASH_POINTS, build_evm_sweeper
from escrowd.models import (
    AuditLog,
    DepositAddress,
    LedgerTransfer,
    Payout,
    PayoutReason,
    PayoutTransaction,
)
from escrowd.models.db import make_engine
from tests.evm_fixtures import EvmChain, anvil_chain
from tests.payout_fixtures import (
    CHAIN,
    PASSPHRASE,
    EvmPayoutWorld,
    make_evm_world,
    record_deposit,
)

__all__ = ["anvil_chain"]

pytestmark = pytest.mark.anvil

KILLED = 137
# Fresh deposit addresses per run: each step is reached at least this often in every run.
FRESH_PER_RUN = 2
# Base fee at the start of even and odd runs: more than GAS_MARGIN apart.
BASE_FEES_WEI = (10**9, 8 * 10**9)


@pytest.fixture
def world(anvil_chain: EvmChain, sqlite_url: str, tmp_path: Path) -> Iterator[EvmPayoutWorld]:
    engine: Engine = make_engine(sqlite_url)
    yield make_evm_world(anvil_chain, sqlite_url, engine, tmp_path)
    engine.dispose()


@contextmanager
def _block_interval(chain: EvmChain) -> Iterator[None]:
    """Blocks every second instead of one per transaction, as on a real chain; on exit,
    one more block takes what the sweeper left in the mempool, then mining stops so the
    test reads balances at a still head (reconcile reads address by address)."""
    _rpc(chain.w3, "evm_setIntervalMining", [1])
    try:
        yield
    finally:
        _rpc(chain.w3, "evm_setIntervalMining", [0])
        _rpc(chain.w3, "evm_setAutomine", [True])
        mine_blocks(chain.w3)


def _run_sweeper(
    world: EvmPayoutWorld, *, crash_at: str | None = None, crash_after: int = 1
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["ESCROWD_KEYSTORE_PASSPHRASE"] = PASSPHRASE
    env.pop("ESCROWD_TEST_CRASH_AT", None)
    if crash_at is not None:
        env["ESCROWD_TEST_CRASH_AT"] = crash_at
        env["ESCROWD_TEST_CRASH_AFTER"] = str(crash_after)
    command = [sys.executable, "-m", "escrowd.escrow.sweeps", "--config", str(world.config_path)]
    return subprocess.Popen(
        [*command, "--chain", CHAIN, "--until-idle"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


class Deposits:
    """Agents' deposit addresses receiving USDC on chain, recorded and credited in the
    ledger as a confirmed deposit would be (custody -> agent)."""

    def __init__(self, world: EvmPayoutWorld) -> None:
        self.world = world
        self.received: Counter[str] = Counter()
        self.agents: dict[str, int] = {}

    def address(self, index: int) -> str:
        address = self.world.keystore.derive_evm(index).address
        if address not in self.agents:
            with self.world.sessions() as s, s.begin():
                agent = service.register_agent(s, f"agent-{index}")
                s.add(
                    DepositAddress(
                        agent_id=agent.id, chain="evm", address=address, derivation_index=index
                    )
                )
                self.agents[address] = agent.id
        return address

    def arrive(self, address: str, amount: int) -> None:
        self.world.chain.token.mint(address, amount)
        with self.world.sessions() as s, s.begin():
            record_deposit(s, chain=CHAIN, asset="USDC", address=address, amount=amount)
        self.received[address] += amount


def _fund_gas_wallet(world: EvmPayoutWorld) -> None:
    gas_wallet = world.keystore.evm_gas_wallet.address
    dev = world.chain.accounts[0]
    world.chain.w3.eth.send_transaction({"from": dev, "to": gas_wallet, "value": Wei(10**19)})


def test_killed_sweeper_moves_each_deposit_exactly_once(world: EvmPayoutWorld) -> None:
    rng = random.Random(11)
    chain = world.chain
    _fund_gas_wallet(world)
    deposits = Deposits(world)
    # One address already holds ETH: its sweep skips gas funding.
    with_gas = deposits.address(0)
    chain.w3.eth.send_transaction({"from": chain.accounts[0], "to": with_gas, "value": Wei(10**17)})
    deposits.arrive(with_gas, 3_000_000)

    runs: list[tuple[str | None, int]] = [(p, rng.randint(1, FRESH_PER_RUN)) for p in CRASH_POINTS]
    runs.append((None, 0))  # SIGKILL at a random moment
    exits: list[int] = []
    next_index = 1
    for run, (point, after) in enumerate(runs):
        for _ in range(FRESH_PER_RUN):
            deposits.arrive(deposits.address(next_index), 1_000_000 + next_index)
            next_index += 1
        # A repeat deposit to an address a previous run swept (or was sweeping).
        deposits.arrive(deposits.address(rng.randrange(next_index)), 500_000 + run)
        # Fees move while the sweeper is down: a sweep funded at one fee level may be
        # signed at another, several times higher.
        _rpc(chain.w3, "anvil_setNextBlockBaseFeePerGas", [hex(BASE_FEES_WEI[run % 2])])
        with _block_interval(chain):
            if point is None:
                proc = _run_sweeper(world)
                time.sleep(rng.uniform(2.5, 3.5))  # interpreter start-up is ~2 s of this
                proc.kill()
                exits.append(proc.wait(timeout=10))
            else:
                proc = _run_sweeper(world, crash_at=point, crash_after=after)
                exits.append(proc.wait(timeout=60))
        # Whatever the sweeper left behind, custody on chain still matches the ledger.
        assert world.reconcile_differences() == []
    assert exits[: len(CRASH_POINTS)] == [KILLED] * len(CRASH_POINTS), exits
    with world.sessions() as s:
        transfers_before = s.scalar(select(func.count()).select_from(LedgerTransfer))

    with _block_interval(chain):
        final = _run_sweeper(world)
        _, stderr = final.communicate(timeout=90)
    assert final.returncode == 0, stderr.decode()[-2000:]

    with world.sessions() as s:
        sweeps = list(s.scalars(select(Payout).where(Payout.reason == PayoutReason.SWEEP.value)))
        funding = list(
            s.scalars(
                select(PayoutTransaction.tx_hash).where(
                    PayoutTransaction.payout_id.in_([p.id for p in sweeps]),
                    PayoutTransaction.tx_hash.not_in([p.tx_hash for p in sweeps]),
                )
            )
        )
        confirmed_rows = Counter(
            s.scalars(select(AuditLog.stream).where(AuditLog.action == "sweep_confirmed"))
        )
        assert s.scalar(select(func.count()).select_from(LedgerTransfer)) == transfers_before
    assert {p.status for p in sweeps} == {"confirmed"}
    assert confirmed_rows == Counter(f"payout:{p.id}" for p in sweeps)

    hot = world.hot.lower()
    logs = chain.source.get_transfer_logs(world.token, 0, chain.source.head())
    swept = [log for log in logs if log.from_addr.lower() in {a.lower() for a in deposits.agents}]
    # Every USDC transfer out of a deposit address is one confirmed sweep to the hot wallet.
    assert all(log.to_addr.lower() == hot for log in swept)
    assert sorted((log.tx_hash, log.amount) for log in swept) == sorted(
        (str(p.tx_hash), p.amount) for p in sweeps
    )
    moved: Counter[str] = Counter()
    for log in swept:
        moved[log.from_addr.lower()] += log.amount
    assert moved == Counter({a.lower(): n for a, n in deposits.received.items()})
    for address in deposits.agents:
        assert chain.token.balance_of(address) == 0
        # Nothing was sent from the address beyond the sweeps the database records.
        sent = chain.source.nonce(address, pending=True)
        assert sent == sum(1 for p in sweeps if p.source_address == address)
    assert chain.token.balance_of(world.hot) == sum(deposits.received.values())
    # The gas wallet sent exactly the funding transactions stored, each mined once.
    gas_sent = chain.source.nonce(world.keystore.evm_gas_wallet.address, pending=True)
    assert gas_sent == len(funding)
    assert all(chain.source.receipt(tx_hash) is not None for tx_hash in funding)
    assert world.reconcile_differences() == []
    assert world.ledger_clean()


def test_a_stored_sweep_its_address_cannot_pay_for_gets_gas_not_a_new_signature(
    world: EvmPayoutWorld,
) -> None:
    """Fees can rise between funding and signing (or the gas was spent): the stored sweep
    must still land as signed, so the address is topped up to its fee cap."""
    _fund_gas_wallet(world)
    deposits = Deposits(world)
    address = deposits.address(0)
    deposits.arrive(address, 2_000_000)
    crash = CrashHook(point="after_sweep_store", exit_process=False)
    with pytest.raises(SimulatedCrash):
        build_evm_sweeper(
            world.sessions, world.settings, CHAIN, world.keystore, crash=crash
        ).run_until_idle()
    with world.sessions() as s:
        stored = s.scalars(select(Payout).where(Payout.reason == PayoutReason.SWEEP.value)).one()
    assert stored.status == "signed"
    # Far less than the stored transaction's gas limit x max fee per gas.
    _rpc(world.chain.w3, "anvil_setBalance", [address, hex(10**9)])

    build_evm_sweeper(world.sessions, world.settings, CHAIN, world.keystore).run_until_idle()
    with world.sessions() as s:
        swept = s.get_one(Payout, stored.id)
        actions = list(
            s.scalars(
                select(AuditLog.action)
                .where(AuditLog.stream == f"payout:{stored.id}")
                .order_by(AuditLog.seq)
            )
        )
    assert (swept.status, swept.tx_hash) == ("confirmed", stored.tx_hash)
    assert actions == [
        "sweep_requested",
        "sweep_gas_funded",
        "sweep_signed",
        "sweep_gas_funded",
        "sweep_confirmed",
    ]
    assert world.chain.source.nonce(address, pending=True) == 1
    assert world.chain.token.balance_of(address) == 0
    assert world.chain.token.balance_of(world.hot) == 2_000_000
    assert world.reconcile_differences() == []
    assert world.ledger_clean()
