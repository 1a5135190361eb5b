"""Sweeps: consolidate USDC from EVM deposit addresses into the hot wallet.

A sweep is a `payouts` row with reason ``sweep`` (source = the deposit address,
destination = the hot wallet) and no ledger effect: both ends are custody of the same
chain and asset, so agents' balances and ``custody(chain, asset)`` are unchanged, and
reconciliation (which sums every custody address) is unaffected. Audit rows record each
step in the payout's stream; no webhook event is sent (nothing changed for any agent).

Steps, each stored before anything is sent (the payout rules):
1. the deposit address lacks gas: the gas wallet sends it ETH for one transfer at the
   quoted fee (stored as a transaction of the sweep, recognisable by its recipient);
2. once that is mined, the deposit address (key derived from the seed) signs the USDC
   transfer to the hot wallet with its own escrowd-owned nonce; if fees rose in between
   so that it cannot pay that transaction's fee cap, the gas wallet tops it up (step 1
   again) rather than the sweep being re-signed;
3. confirmed at the chain's depth (or failed for good on a revert).
At most one open sweep per deposit address, so a sweep is never duplicated. States:
requested -> signed -> confirmed | failed. Run one sweeper per chain (a scheduler job
under its advisory lock), like every other job.

Run passes from the command line (used by the crash tests):
``python -m escrow.sweeps --config FILE --chain NAME [--until-idle]``.

Solana sweeps need no gas funding (the hot wallet is the fee payer, the deposit key
co-signs), so `discover_solana_sweeps` only creates the sweep rows and the payout worker
(`SolanaPayoutChain(..., deposit_key=keystore.derive_solana)`) drives them like payouts;
the fee it pays in SOL is booked as network cost, like a payout's.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

import rlp
import structlog
from eth_utils.address import to_checksum_address
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import Settings
from escrowd.escrow import audit
from escrowd.escrow.uow import in_transaction
from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_sender import ERC20_TRANSFER_GAS, EvmSender, decode_fees, quote_fees
from escrowd.indexer.evm_source import EvmSource
from escrowd.indexer.sending import SignedTx, TxState
from escrowd.indexer.solana_source import SolanaSource
from escrowd.models import (
    Asset,
    Chain,
    DepositAddress,
    Payout,
    PayoutReason,
    PayoutStatus,
    PayoutTransaction,
    utcnow,
)
from escrowd.wallets.keystore import EvmKey, UnlockedKeystore

log = structlog.get_logger(__name__)

OPEN = (PayoutStatus.REQUESTED.value, PayoutStatus.SIGNED.value, PayoutStatus.BROADCAST.value)
# Gas sent to a deposit address covers this many times one transfer at the quoted fee.
GAS_MARGIN = 2
# A Solana sweep that failed is not retried for this long, doubled per failure in a row.
SOLANA_SWEEP_RETRY = timedelta(minutes=5)
SOLANA_SWEEP_RETRY_MAX = timedelta(hours=6)
# Where a crash test may kill the EVM sweeper; each leaves different state stored.
CRASH_POINTS = (
    "after_fund_sign",
    "after_fund_store",
    "after_fund_broadcast",
    "after_sweep_sign",
    "after_sweep_store",
    "after_sweep_broadcast",
    "before_confirm",
)


@dataclass
class SweepStats:
    created: int = 0
    funded: int = 0
    sent: int = 0
    confirmed: int = 0
    failed: int = 0


def create_sweep(
    session: Session,
    *,
    chain: str,
    asset: Asset,
    source: str,
    agent_id: int,
    destination: str,
    amount: int,
) -> bool:
    """A sweep row in status requested unless one is open for (source, asset); no
    ledger effect. False when one already exists."""
    previous = session.scalars(
        select(Payout.status).where(
            Payout.chain == chain,
            Payout.reason == PayoutReason.SWEEP.value,
            Payout.source_address == source,
            Payout.asset_id == asset.id,
        )
    ).all()
    if any(status in OPEN for status in previous):
        return False
    payout = Payout(
        idempotency_key=f"sweep:{chain}:{source}:{asset.symbol}:{len(previous)}",
        chain=chain,
        asset_id=asset.id,
        agent_id=agent_id,
        reason=PayoutReason.SWEEP.value,
        source_address=source,
        destination=destination,
        amount=amount,
    )
    session.add(payout)
    session.flush()
    audit.append(
        session,
        stream=f"payout:{payout.id}",
        actor="sweeper",
        action="sweep_requested",
        asset=asset.symbol,
        amount=amount,
        details={"chain": chain, "source": source, "destination": destination},
    )
    return True


def discover_solana_sweeps(
    sessions: sessionmaker[Session],
    source: SolanaSource,
    *,
    chain: str,
    hot_wallet: str,
    min_base_units: dict[str, int],
) -> int:
    """Create a sweep for every Solana deposit address holding at least the minimum of
    an asset (SOL: its whole balance, the hot wallet pays the fee; USDC: the sum over all
    its token accounts of the mint, which the signed sweep takes from each). The payout
    worker, built with `deposit_key`, signs and sends them. After a sweep of an address
    and asset failed, the next waits `SOLANA_SWEEP_RETRY` doubled per failure in a row."""
    with sessions() as session:
        assets = list(session.scalars(select(Asset).where(Asset.chain == chain)))
        rows = session.execute(
            select(DepositAddress.address, DepositAddress.agent_id).where(
                DepositAddress.chain == Chain.SOLANA.value
            )
        ).all()
        not_before = _after_failures(session, chain)
    created = 0
    now = utcnow()
    for address, agent_id in rows:
        for asset in assets:
            wait = not_before.get((address, asset.id))
            if wait is not None and now < wait[0]:
                if (chain, address, asset.id, wait[1]) not in _BACKOFF_LOGGED:
                    _BACKOFF_LOGGED.add((chain, address, asset.id, wait[1]))
                    log.warning(
                        "sweep_backing_off",
                        chain=chain,
                        source=address,
                        asset=asset.symbol,
                        failures=wait[1],
                        next_attempt=wait[0].isoformat(),
                    )
                continue
            if asset.token_address is None:
                balance = source.get_balance(address)
            else:
                balance = sum(
                    account.amount_base_units
                    for account in source.get_token_accounts_by_owner(address, asset.token_address)
                )
            if balance < max(1, min_base_units.get(asset.symbol, 1)):
                continue
            create = functools.partial(
                create_sweep,
                chain=chain,
                asset=asset,
                source=address,
                agent_id=agent_id,
                destination=hot_wallet,
                amount=balance,
            )
            created += in_transaction(sessions, create)
    return created


# Each (chain, address, asset, failures) backing off is logged once per process.
_BACKOFF_LOGGED: set[tuple[str, str, int, int]] = set()


def _after_failures(session: Session, chain: str) -> dict[tuple[str, int], tuple[datetime, int]]:
    """(source, asset id) whose latest sweeps failed: when the next may start, and how
    many failed in a row."""
    failed: dict[tuple[str, int], tuple[int, datetime]] = {}
    for row in session.execute(
        select(Payout.source_address, Payout.asset_id, Payout.status, Payout.updated_at)
        .where(Payout.chain == chain, Payout.reason == PayoutReason.SWEEP.value)
        .order_by(Payout.id)
    ):
        key = (row.source_address, row.asset_id)
        if row.status == PayoutStatus.FAILED.value:
            failed[key] = (failed.get(key, (0, row.updated_at))[0] + 1, row.updated_at)
        else:
            failed.pop(key, None)
    return {
        key: (at + min(SOLANA_SWEEP_RETRY_MAX, SOLANA_SWEEP_RETRY * 2 ** (count - 1)), count)
        for key, (count, at) in failed.items()
    }


def _recipient(raw_tx: bytes) -> str:
    fields = rlp.decode(raw_tx[1:])
    return str(to_checksum_address(bytes(fields[5])))


class EvmSweeper:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        source: EvmSource,
        *,
        chain: str,
        chain_id: int,
        gas_wallet: EvmKey,
        hot_wallet: str,
        deposit_key: Callable[[int], EvmKey],
        max_fee_gwei: int,
        confirmations: int,
        min_amount_base_units: int,
        crash: Callable[[str], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.crash = crash or (lambda point: None)
        self.source = source
        self.chain = chain
        self.hot_wallet = to_checksum_address(hot_wallet)
        self.deposit_key = deposit_key
        self.min_amount = max(1, min_amount_base_units)
        self._sender_args = {
            "chain": chain,
            "chain_id": chain_id,
            "max_fee_gwei": max_fee_gwei,
            "confirmations": confirmations,
        }
        self.gas = EvmSender(source, gas_wallet, **self._sender_args)  # type: ignore[arg-type]

    def _sender(self, key: EvmKey) -> EvmSender:
        return EvmSender(self.source, key, **self._sender_args)  # type: ignore[arg-type]

    def _asset(self, session: Session) -> Asset:
        return session.scalars(
            select(Asset).where(Asset.chain == self.chain, Asset.symbol == "USDC")
        ).one()

    def run_once(self) -> SweepStats:
        stats = SweepStats()
        self._discover(stats)
        with self.sessions() as session:
            open_ids = list(
                session.scalars(
                    select(Payout.id).where(
                        Payout.chain == self.chain,
                        Payout.reason == PayoutReason.SWEEP.value,
                        Payout.status.in_(OPEN),
                    )
                )
            )
        for payout_id in open_ids:
            self._advance(payout_id, stats)
        return stats

    def _open_count(self) -> int:
        with self.sessions() as session:
            count = session.scalar(
                select(func.count())
                .select_from(Payout)
                .where(
                    Payout.chain == self.chain,
                    Payout.reason == PayoutReason.SWEEP.value,
                    Payout.status.in_(OPEN),
                )
            )
        return count or 0

    def run_until_idle(self, *, max_passes: int = 200, pause_s: float = 0.05) -> SweepStats:
        """Passes until nothing is left to sweep on this chain (tests, CLI)."""
        total = SweepStats()
        for _ in range(max_passes):
            stats = self.run_once()
            for name in (f.name for f in fields(SweepStats)):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            # A pass that confirmed a sweep may leave a later deposit to its address for
            # the next one to find: idle is a pass that did nothing with nothing open.
            if stats == SweepStats() and self._open_count() == 0:
                break
            time.sleep(pause_s)
        return total

    def _discover(self, stats: SweepStats) -> None:
        with self.sessions() as session:
            token = self._asset(session).token_address
            rows = session.execute(
                select(DepositAddress.address, DepositAddress.agent_id).where(
                    DepositAddress.chain == Chain.EVM.value
                )
            ).all()
            busy = set(
                session.scalars(
                    select(Payout.source_address).where(
                        Payout.chain == self.chain,
                        Payout.reason == PayoutReason.SWEEP.value,
                        Payout.status.in_(OPEN),
                    )
                )
            )
        assert token is not None
        for address, agent_id in rows:
            if address in busy:
                continue
            balance = self.source.erc20_balance(token, address)
            if balance < self.min_amount:
                continue
            create = functools.partial(
                self._create, address=address, agent_id=agent_id, amount=balance
            )
            if in_transaction(self.sessions, create):
                stats.created += 1

    def _create(self, session: Session, address: str, agent_id: int, amount: int) -> bool:
        return create_sweep(
            session,
            chain=self.chain,
            asset=self._asset(session),
            source=address,
            agent_id=agent_id,
            destination=self.hot_wallet,
            amount=amount,
        )

    def _audit(self, session: Session, payout: Payout, action: str, **details: object) -> None:
        audit.append(
            session,
            stream=f"payout:{payout.id}",
            actor="sweeper",
            action=action,
            asset="USDC",
            amount=payout.amount,
            details={
                "chain": payout.chain,
                "source": payout.source_address,
                "destination": payout.destination,
                "tx_hash": payout.tx_hash,
                **details,
            },
        )

    def _transactions(
        self, payout_id: int
    ) -> tuple[list[PayoutTransaction], list[PayoutTransaction]]:
        """(gas funding transactions, sweep transactions) of a sweep, oldest first."""
        with self.sessions() as session:
            payout = session.get(Payout, payout_id)
            assert payout is not None
            txs = list(
                session.scalars(
                    select(PayoutTransaction)
                    .where(PayoutTransaction.payout_id == payout_id)
                    .order_by(PayoutTransaction.id)
                )
            )
            source = to_checksum_address(payout.source_address)
        funding = [t for t in txs if _recipient(t.raw_tx) == source]
        return funding, [t for t in txs if t not in funding]

    def _advance(self, payout_id: int, stats: SweepStats) -> None:
        funding, sweeps = self._transactions(payout_id)
        if funding and self.source.receipt(funding[-1].tx_hash) is None:
            # Gas on its way: the sweep waits for it, its stored bytes sent until mined.
            self._send(funding[-1].raw_tx)
            return
        if sweeps:
            outcome = self._sender(self._key_of(payout_id)).outcome([t.tx_hash for t in sweeps])
            if outcome.state is TxState.PENDING:
                if outcome.tx_hash is None and not self._top_up(payout_id, sweeps[-1], stats):
                    self._send(sweeps[-1].raw_tx)
                return
            self.crash("before_confirm")
            in_transaction(
                self.sessions,
                lambda s: self._finish(
                    s, payout_id, outcome.state, outcome.tx_hash, outcome.block_number
                ),
            )
            if outcome.state is TxState.CONFIRMED:
                stats.confirmed += 1
            else:
                stats.failed += 1
            return
        if self._top_up(payout_id, None, stats):
            return
        key = self._key_of(payout_id)
        signed = in_transaction(self.sessions, lambda s: self._sign_sweep(s, payout_id, key))
        self.crash("after_sweep_store")
        self._send(signed.raw_tx)
        self.crash("after_sweep_broadcast")
        stats.sent += 1

    def _top_up(self, payout_id: int, stored: PayoutTransaction | None, stats: SweepStats) -> bool:
        """Send the deposit address the gas it lacks, for the stored sweep transaction or
        (none stored yet) one at today's fees; False when it has enough."""
        signed = in_transaction(self.sessions, lambda s: self._fund_gas(s, payout_id, stored))
        if signed is None:
            return False
        stats.funded += 1
        self.crash("after_fund_store")
        self._send(signed.raw_tx)
        self.crash("after_fund_broadcast")
        return True

    def _send(self, raw_tx: bytes) -> None:
        try:
            self.source.send_raw_transaction(raw_tx)
        except RpcError as exc:
            # The bytes stay stored; the next pass sends them again.
            log.warning("sweep_send_failed", error=str(exc))

    def _key_of(self, payout_id: int) -> EvmKey:
        with self.sessions() as session:
            source = session.scalar(select(Payout.source_address).where(Payout.id == payout_id))
            index = session.scalar(
                select(DepositAddress.derivation_index).where(
                    DepositAddress.chain == Chain.EVM.value, DepositAddress.address == source
                )
            )
        assert index is not None, "a sweep's source is one of our deposit addresses"
        key = self.deposit_key(index)
        assert key.address.lower() == str(source).lower(), "deposit key derivation mismatch"
        return key

    def _store(self, session: Session, payout: Payout, signed: SignedTx) -> None:
        session.add(
            PayoutTransaction(
                payout_id=payout.id,
                tx_hash=signed.tx_hash,
                raw_tx=signed.raw_tx,
                nonce=signed.nonce,
                max_fee_per_gas=signed.max_fee_per_gas,
            )
        )

    def _fund_gas(
        self, session: Session, payout_id: int, stored: PayoutTransaction | None
    ) -> SignedTx | None:
        payout = session.get(Payout, payout_id)
        assert payout is not None and payout.status in OPEN
        # A stored sweep is never re-signed, so when fees moved between funding and
        # signing its own fee cap is what the address must cover, or it never lands.
        fees = (
            decode_fees(stored.raw_tx)[1]
            if stored is not None
            else quote_fees(self.source, self.gas.cap_wei)
        )
        need = ERC20_TRANSFER_GAS * fees.max_fee_per_gas
        have = self.source.native_balance_wei(payout.source_address)
        if have >= need:
            return None
        signed = self.gas.sign_native_transfer(
            session, to=payout.source_address, amount_wei=GAS_MARGIN * need - have
        )
        self.crash("after_fund_sign")
        self._store(session, payout, signed)
        self._audit(session, payout, "sweep_gas_funded", funding_tx_hash=signed.tx_hash)
        return signed

    def _sign_sweep(self, session: Session, payout_id: int, key: EvmKey) -> SignedTx:
        payout = session.get(Payout, payout_id)
        assert payout is not None and payout.status == PayoutStatus.REQUESTED.value
        asset = self._asset(session)
        assert asset.token_address is not None
        signed = self._sender(key).sign_token_transfer(
            session, token=asset.token_address, to=self.hot_wallet, amount_base_units=payout.amount
        )
        self.crash("after_sweep_sign")
        self._store(session, payout, signed)
        payout.status = PayoutStatus.SIGNED.value
        payout.tx_hash = signed.tx_hash
        payout.raw_tx = signed.raw_tx
        payout.nonce = signed.nonce
        payout.attempts += 1
        session.flush()
        self._audit(session, payout, "sweep_signed")
        return signed

    def _finish(
        self,
        session: Session,
        payout_id: int,
        state: TxState,
        tx_hash: str | None,
        block: int | None,
    ) -> None:
        payout = session.get(Payout, payout_id)
        assert payout is not None and payout.status in OPEN
        payout.status = (
            PayoutStatus.CONFIRMED.value
            if state is TxState.CONFIRMED
            else PayoutStatus.FAILED.value
        )
        payout.tx_hash = tx_hash
        payout.block_number = block
        session.flush()
        self._audit(session, payout, f"sweep_{payout.status}")
        log.info("sweep_finished", payout_id=payout_id, status=payout.status, tx_hash=tx_hash)


def build_evm_sweeper(
    sessions: sessionmaker[Session],
    settings: Settings,
    chain: str,
    keystore: UnlockedKeystore,
    source: EvmSource | None = None,
    *,
    crash: Callable[[str], None] | None = None,
) -> EvmSweeper:
    """The sweeper of a configured EVM chain: gas from the keystore's gas wallet, USDC
    into its hot wallet, deposit keys derived from its seed; the dust minimum is the
    payout minimum. `source` defaults to the chain's JSON-RPC URLs."""
    from escrowd.indexer.evm_source import JsonRpcEvmSource

    evm = settings.evm_chain(chain)
    return EvmSweeper(
        sessions,
        source or JsonRpcEvmSource.for_chain(evm),
        chain=evm.name,
        chain_id=evm.chain_id,
        gas_wallet=keystore.evm_gas_wallet,
        hot_wallet=keystore.evm_hot_wallet.address,
        deposit_key=keystore.derive_evm,
        max_fee_gwei=evm.max_fee_gwei,
        confirmations=evm.confirmations,
        min_amount_base_units=settings.payouts.min_usdc_base_units,
        crash=crash,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from pathlib import Path

    from escrowd.config.settings import load_settings
    from escrowd.escrow.payout_worker import CrashHook, unlock_from_settings
    from escrowd.models.db import make_engine, make_session_factory

    parser = argparse.ArgumentParser(prog="python -m escrow.sweeps")
    parser.add_argument("--config", required=True)
    parser.add_argument("--chain", required=True)
    parser.add_argument("--until-idle", action="store_true")
    args = parser.parse_args(argv)
    settings = load_settings(Path(args.config))
    engine = make_engine(settings.resolved_database_url)
    sweeper = build_evm_sweeper(
        make_session_factory(engine),
        settings,
        args.chain,
        unlock_from_settings(settings),
        crash=CrashHook.from_env(CRASH_POINTS),
    )
    stats = sweeper.run_until_idle() if args.until_idle else sweeper.run_once()
    print(stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
