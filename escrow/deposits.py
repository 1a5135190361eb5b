"""Crediting deposits: the one place a chain deposit becomes an agent balance."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from prometheus_client import Counter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from escrowd.escrow import accounts, audit, events, ledger
from escrowd.escrow.errors import InsufficientFunds
from escrowd.indexer.sink import StoredDeposit
from escrowd.models import Agent, Asset, Deposit, DepositStatus, LedgerTransfer, TransferCode

log = structlog.get_logger(__name__)

DEEP_REORG_REVERSALS = Counter(
    "escrowd_deep_reorg_reversals_total",
    "Credited deposits orphaned by a reorg deeper than the confirmation depth.",
    ["chain", "outcome"],
)
DEPOSITS_CREDITED = Counter(
    "escrowd_deposits_credited_total", "Deposits credited to agents.", ["chain", "asset"]
)


def _generation(session: Session, deposit: Deposit) -> int:
    """How many times this deposit was credited before: a deposit re-mined after a deep
    reorg reversed its credit is credited again under a new idempotency key."""
    count = session.scalar(
        select(func.count())
        .select_from(LedgerTransfer)
        .where(
            LedgerTransfer.ref_type == "deposit",
            LedgerTransfer.ref_id == str(deposit.id),
            LedgerTransfer.code == TransferCode.DEPOSIT,
        )
    )
    return int(count or 0)


def _stream(deposit: Deposit) -> str:
    return f"deposit:{deposit.chain}:{deposit.id}"


def _event_data(deposit: Deposit | StoredDeposit, asset: Asset, agent: str) -> dict[str, object]:
    """A deposit.* event's data; `agent` is the marketplace's id of the agent."""
    return {
        "deposit_id": deposit.id,
        "agent": agent,
        "network": deposit.chain,
        "asset": asset.symbol,
        "amount_base_units": str(deposit.amount),
        "tx_hash": deposit.tx_hash,
        "log_index": deposit.log_index,
        "block_number": deposit.block_number,
        "status": deposit.status,
    }


class LedgerDepositSink:
    """Credits confirmed deposits into the ledger with audit rows and webhook events."""

    def recorded(self, session: Session, deposit: Deposit) -> None:
        self.recorded_many(session, [StoredDeposit.of(deposit)])

    def recorded_many(self, session: Session, deposits: Sequence[StoredDeposit]) -> None:
        """Audit rows and events for a batch of new deposits, in a few set-based statements.

        Sightings of one chain share a stream: the chain's poller is the only writer, so it
        costs no contention, and one head lock covers the whole batch."""
        if not deposits:
            return
        assets = {
            asset.id: asset
            for asset in session.scalars(
                select(Asset).where(Asset.id.in_({d.asset_id for d in deposits}))
            )
        }
        chains = {d.chain for d in deposits}
        for chain in sorted(chains):
            audit.append_bulk(
                session,
                f"deposits-seen:{chain}",
                [
                    audit.Entry(
                        actor="indexer",
                        action="deposit_seen",
                        asset=assets[d.asset_id].symbol,
                        amount=d.amount,
                        details={
                            "deposit_id": d.id,
                            "tx_hash": d.tx_hash,
                            "log_index": d.log_index,
                            "block_number": d.block_number,
                            "block_hash": d.block_hash,
                            "agent_id": d.agent_id,
                        },
                    )
                    for d in deposits
                    if d.chain == chain
                ],
            )
        agents = dict(
            session.execute(
                select(Agent.id, Agent.external_id).where(
                    Agent.id.in_({d.agent_id for d in deposits})
                )
            ).all()
        )
        events.emit_many(
            session,
            [
                ("deposit.pending", _event_data(d, assets[d.asset_id], agents[d.agent_id]))
                for d in deposits
            ],
        )

    def confirmed(self, session: Session, deposit: Deposit) -> None:
        assert deposit.status == DepositStatus.PENDING, "only pending deposits are confirmed"
        assert not deposit.credited
        asset = session.get_one(Asset, deposit.asset_id)
        generation = _generation(session, deposit)
        suffix = f":{generation}" if generation else ""
        ledger.post(
            session,
            [
                ledger.TransferSpec(
                    idempotency_key=f"deposit:{deposit.chain}:{deposit.id}{suffix}",
                    debit_account_id=accounts.custody(session, deposit.chain, asset.symbol).id,
                    credit_account_id=accounts.agent_available(
                        session, deposit.agent_id, asset.symbol
                    ).id,
                    amount=deposit.amount,
                    code=TransferCode.DEPOSIT,
                    ref_type="deposit",
                    ref_id=str(deposit.id),
                )
            ],
            actor="indexer",
            audit_stream=_stream(deposit),
        )
        deposit.status = DepositStatus.CONFIRMED
        deposit.credited = True
        session.flush()
        agent = session.get_one(Agent, deposit.agent_id).external_id
        events.emit(session, "deposit.confirmed", _event_data(deposit, asset, agent))
        DEPOSITS_CREDITED.labels(deposit.chain, asset.symbol).inc()
        log.info(
            "deposit_credited",
            chain=deposit.chain,
            tx_hash=deposit.tx_hash,
            log_index=deposit.log_index,
            agent_id=deposit.agent_id,
            amount_base_units=deposit.amount,
            asset=asset.symbol,
        )

    def orphaned(self, session: Session, deposit: Deposit) -> None:
        asset = session.get_one(Asset, deposit.asset_id)
        was_credited = deposit.credited and not deposit.reversed
        deposit.status = DepositStatus.ORPHANED
        session.flush()
        audit.append(
            session,
            stream=_stream(deposit),
            actor="indexer",
            action="deposit_orphaned",
            asset=asset.symbol,
            amount=deposit.amount,
            details={"tx_hash": deposit.tx_hash, "block_hash": deposit.block_hash},
        )
        agent = session.get_one(Agent, deposit.agent_id).external_id
        events.emit(session, "deposit.orphaned", _event_data(deposit, asset, agent))
        if was_credited:
            self._reverse(session, deposit, asset)

    def _reverse(self, session: Session, deposit: Deposit, asset: Asset) -> None:
        # A reorg deeper than the confirmation depth took back money we already credited.
        log.error(
            "deep_reorg_credited_deposit_orphaned",
            chain=deposit.chain,
            tx_hash=deposit.tx_hash,
            agent_id=deposit.agent_id,
            amount_base_units=deposit.amount,
        )
        try:
            with session.begin_nested():
                ledger.post(
                    session,
                    [
                        ledger.TransferSpec(
                            idempotency_key=(
                                f"deposit-reversal:{deposit.chain}:{deposit.id}:"
                                f"{_generation(session, deposit)}"
                            ),
                            debit_account_id=accounts.agent_available(
                                session, deposit.agent_id, asset.symbol
                            ).id,
                            credit_account_id=accounts.custody(
                                session, deposit.chain, asset.symbol
                            ).id,
                            amount=deposit.amount,
                            code=TransferCode.DEPOSIT_REVERSAL,
                            ref_type="deposit",
                            ref_id=str(deposit.id),
                        )
                    ],
                    actor="indexer",
                    audit_stream=_stream(deposit),
                )
        except InsufficientFunds:
            DEEP_REORG_REVERSALS.labels(deposit.chain, "shortfall").inc()
            audit.append(
                session,
                stream=_stream(deposit),
                actor="indexer",
                action="deposit_reversal_shortfall",
                asset=asset.symbol,
                amount=deposit.amount,
                details={
                    "tx_hash": deposit.tx_hash,
                    "reason": "agent balance no longer covers the orphaned credit",
                },
            )
            log.error(
                "deposit_reversal_shortfall",
                chain=deposit.chain,
                tx_hash=deposit.tx_hash,
                agent_id=deposit.agent_id,
            )
            return
        deposit.reversed = True
        session.flush()
        DEEP_REORG_REVERSALS.labels(deposit.chain, "reversed").inc()
