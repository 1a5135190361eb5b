"""Crediting deposits: the one place a chain deposit becomes an agent balance.

The indexers call a `LedgerDepositSink` (indexer.sink.DepositSink) inside their own
transactions: `recorded_many` when they store new deposits, `confirmed_many` with a whole
confirmation pass once the chain has made deposits final, `orphaned` when a deposit's block
leaves the chain. `confirmed` credits a single deposit through `ledger.post`; the batch path
writes the same rows, hashes and payloads in a few set-based statements whatever the
number of deposits (tests/test_crediting_paths.py compares them on both databases). A
backfill window stores deposits already final confirmed (`final_columns`) and credits them
with `credited_new`: the batch path without reading back and claiming rows nobody else
can see yet.

Amounts: a deposit's `amount` is in its chain token's base units (uint256, the token's own
decimals); the ledger keeps the asset at one scale (`registry.ledger_decimals`). Crediting
converts exactly: the whole ledger units are credited, a remainder below one ledger unit is
held on chain as dust, never rounded up, and an amount too large for the ledger is refused.
Either is recorded on the deposit (`credit_state`, `credit_note`), in its audit stream and
its events.

Races: a deposit is credited only while its row is locked and still pending at the block
hash the caller checked, so two daemons, or a backfill and the daemon, credit it once; the
loser finds it confirmed and leaves it. A re-credit after a reorg (the deposit came back)
posts under a new idempotency key and only what the reversal took back.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog
from prometheus_client import Counter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from escrowd.escrow import accounts, audit, events, ledger
from escrowd.escrow.audit import json_string
from escrowd.escrow.money import to_ledger_units
from escrowd.indexer.sink import Finalized, StoredDeposit
from escrowd.models import (
    AccountKind,
    Agent,
    Asset,
    Deposit,
    DepositCreditState,
    DepositStatus,
    LedgerAccount,
    LedgerTransfer,
    TransferCode,
    bulk,
    utcnow,
)
from escrowd.models.db import IN_LIST_BATCH, driver_cursor
from escrowd.models.registry import ledger_decimals

log = structlog.get_logger(__name__)

DEEP_REORG_REVERSALS = Counter(
    "escrowd_deep_reorg_reversals_total",
    "Credited deposits orphaned by a reorg deeper than the confirmation depth.",
    ["chain", "outcome"],
)
DEPOSITS_CREDITED = Counter(
    "escrowd_deposits_credited_total", "Deposits credited to agents.", ["chain", "asset"]
)
DEPOSITS_UNCREDITED = Counter(
    "escrowd_deposits_uncredited_total",
    "Final deposits not credited, or not in full: reason dust (below one ledger unit, "
    "held on chain) or refused (too large for a ledger amount).",
    ["chain", "reason"],
)

# Agents' external ids remembered per sink: they never change once registered.
_AGENT_NAMES_KEPT = 100_000
_STANDING = (DepositCreditState.CREDITED.value, DepositCreditState.REVERSAL_SHORT.value)
# Plain strings of the states a pass writes for every deposit (an enum's .value is a
# property call each time).
_PENDING, _CONFIRMED = DepositStatus.PENDING.value, DepositStatus.CONFIRMED.value
_STATE_TEXT = {state: state.value for state in DepositCreditState}


@dataclass(frozen=True, slots=True)
class Credit:
    """What confirming a deposit does to its credit."""

    state: DepositCreditState
    # The deposit's whole value in ledger units once confirmed (0 unless credited).
    ledger_units: int
    # Posted now: the value less what still stands from an earlier credit of it.
    post_units: int
    # Chain units too small for one ledger unit, held on chain (all of them for dust).
    dust_units: int
    note: str | None


def plan_credit(amount: int, decimals: int, symbol: str, standing: int) -> Credit:
    """The credit for a final deposit of `amount` chain base units of a token with
    `decimals`, when `standing` ledger units of an earlier credit of it were never
    reversed."""
    scale = ledger_decimals(symbol)
    units, remainder = to_ledger_units(amount, decimals, scale)
    if units > ledger.MAX_AMOUNT:
        assert standing == 0, "a deposit too large to credit was never credited"
        return Credit(
            DepositCreditState.REFUSED,
            0,
            0,
            0,
            f"refused: {units} {symbol} ledger base units exceed the largest ledger amount "
            f"({ledger.MAX_AMOUNT}); the tokens stay on chain, not credited",
        )
    if units == 0:
        assert standing == 0, "a deposit below one ledger unit was never credited"
        return Credit(
            DepositCreditState.DUST,
            0,
            0,
            amount,
            f"dust: below one ledger unit of {symbol} (10^-{scale}); held on chain, not credited",
        )
    assert 0 <= standing <= units
    note = None
    if remainder:
        note = (
            f"dust: {remainder} base units below one ledger unit of {symbol} (10^-{scale}) "
            "held on chain, not credited"
        )
    return Credit(DepositCreditState.CREDITED, units, units - standing, remainder, note)


def audit_amount(amount: int, decimals: int, symbol: str) -> int | None:
    """A deposit's amount as audit rows record it: in ledger units, like every other audit
    amount of the asset (None when too large for one)."""
    units, _ = to_ledger_units(amount, decimals, ledger_decimals(symbol))
    return units if units <= ledger.MAX_AMOUNT else None


@dataclass(frozen=True, slots=True)
class CreditView:
    """A deposit's credit as the API and webhooks show it."""

    state: str
    credited_base_units: int
    reversal_shortfall_base_units: int
    dust_base_units: int
    note: str | None


def credit_view(deposit: Deposit) -> CreditView:
    """credited/dust/refused/reversed, or reversed short by N ledger units (N of its
    credit still stand)."""
    short = deposit.credit_state == DepositCreditState.REVERSAL_SHORT
    return CreditView(
        state=deposit.credit_state,
        credited_base_units=deposit.credited_base_units,
        reversal_shortfall_base_units=deposit.credited_base_units if short else 0,
        dust_base_units=deposit.dust_base_units,
        note=deposit.credit_note,
    )


class _AssetUnit(NamedTuple):
    """What crediting needs of an asset."""

    symbol: str
    decimals: int


class _Row(NamedTuple):
    """The deposit columns crediting reads and reports, without an ORM object (a named
    tuple: a pass builds two per deposit)."""

    id: int
    chain: str
    tx_hash: str
    log_index: int
    asset_id: int
    agent_id: int
    amount: int
    block_number: int
    block_hash: str
    status: str
    credit_state: str
    credited_base_units: int
    dust_base_units: int
    credit_note: str | None

    @classmethod
    def of(cls, deposit: Deposit) -> _Row:
        return cls(
            deposit.id,
            deposit.chain,
            deposit.tx_hash,
            deposit.log_index,
            deposit.asset_id,
            deposit.agent_id,
            deposit.amount,
            deposit.block_number,
            deposit.block_hash,
            deposit.status,
            deposit.credit_state,
            deposit.credited_base_units,
            deposit.dust_base_units,
            deposit.credit_note,
        )


def _event_data(row: _Row | StoredDeposit, asset: Asset | _AssetUnit, agent: str) -> str:
    """A deposit.* event's data in canonical JSON; `agent` is the marketplace's id of the
    agent. Written from a template (keys sorted): a backfill window emits two per deposit,
    and the generic encoder cost ~4x as much."""
    # A StoredDeposit is a first sighting: nothing credited yet.
    if isinstance(row, _Row):
        state, credited, dust, note = (
            row.credit_state,
            row.credited_base_units,
            row.dust_base_units,
            row.credit_note,
        )
    else:
        state, credited, dust, note = _STATE_TEXT[DepositCreditState.NONE], 0, 0, None
    short = credited if state == DepositCreditState.REVERSAL_SHORT else 0
    return (
        f'{{"agent":{json_string(agent)},"amount_base_units":"{int(row.amount)}",'
        f'"asset":{json_string(asset.symbol)},"block_number":{int(row.block_number)},'
        f'"credit_note":{"null" if note is None else json_string(note)},'
        f'"credit_state":{json_string(state)},"credited_base_units":"{int(credited)}",'
        f'"decimals":{int(asset.decimals)},"deposit_id":{int(row.id)},'
        f'"dust_base_units":"{int(dust)}","log_index":{int(row.log_index)},'
        f'"network":{json_string(row.chain)},"reversal_shortfall_base_units":"{int(short)}",'
        f'"status":{json_string(row.status)},"tx_hash":{json_string(row.tx_hash)}}}'
    )


def _seen_details(d: StoredDeposit, amount: int | None) -> str:
    """A deposit_seen audit row's details in canonical JSON (keys sorted), from a template;
    the amount in base units only when the audit amount (ledger units) is not it."""
    amount_text = "" if amount == d.amount else f'"amount_base_units":"{int(d.amount)}",'
    return (
        f'{{"agent_id":{int(d.agent_id)},{amount_text}"block_hash":{json_string(d.block_hash)},'
        f'"block_number":{int(d.block_number)},"deposit_id":{int(d.id)},'
        f'"log_index":{int(d.log_index)},"tx_hash":{json_string(d.tx_hash)}}}'
    )


def _stream(chain: str, deposit_id: int) -> str:
    return f"deposit:{chain}:{deposit_id}"


def _credit_key(chain: str, deposit_id: int, generation: int) -> str:
    # A deposit re-mined after a deep reorg reversed its credit is credited again under a
    # new key: the generation counts its earlier credits.
    suffix = f":{generation}" if generation else ""
    return f"deposit:{chain}:{deposit_id}{suffix}"


def _generations(session: Session, deposit_ids: Sequence[int]) -> dict[int, int]:
    """How many times each deposit was credited before."""
    counts: dict[int, int] = dict.fromkeys(deposit_ids, 0)
    refs = [str(deposit_id) for deposit_id in deposit_ids]
    for start in range(0, len(refs), IN_LIST_BATCH):
        for ref_id, count in session.execute(
            select(LedgerTransfer.ref_id, func.count())
            .where(
                LedgerTransfer.ref_type == "deposit",
                LedgerTransfer.ref_id.in_(refs[start : start + IN_LIST_BATCH]),
                LedgerTransfer.code == TransferCode.DEPOSIT,
            )
            .group_by(LedgerTransfer.ref_id)
        ):
            counts[int(ref_id)] = int(count)
    return counts


def _conversion_entry(row: _Row, asset: Asset | _AssetUnit, credit: Credit) -> audit.Entry | None:
    """The audit row saying why (part of) a final deposit was not credited."""
    if credit.state == DepositCreditState.REFUSED:
        action = "deposit_refused"
    elif credit.dust_units:
        action = "deposit_dust"
    else:
        return None
    return audit.Entry(
        actor="indexer",
        action=action,
        asset=asset.symbol,
        details={
            "tx_hash": row.tx_hash,
            "log_index": row.log_index,
            "amount_base_units": str(row.amount),
            "decimals": asset.decimals,
            "dust_base_units": str(credit.dust_units),
            "reason": credit.note,
        },
    )


class LedgerDepositSink:
    """Credits confirmed deposits into the ledger with audit rows and webhook events."""

    def __init__(self) -> None:
        self._agent_names: dict[int, str] = {}
        self._asset_units: dict[int, _AssetUnit] = {}

    # --- lookups ----------------------------------------------------------------------

    def _agents(self, session: Session, agent_ids: Collection[int]) -> dict[int, str]:
        """External ids (the marketplace's names for agents) of `agent_ids`."""
        missing = sorted({a for a in agent_ids if a not in self._agent_names})
        if missing:
            if len(self._agent_names) + len(missing) > _AGENT_NAMES_KEPT:
                self._agent_names.clear()
            for start in range(0, len(missing), IN_LIST_BATCH):
                self._agent_names.update(
                    session.execute(
                        select(Agent.id, Agent.external_id).where(
                            Agent.id.in_(missing[start : start + IN_LIST_BATCH])
                        )
                    ).all()
                )
        return {agent_id: self._agent_names[agent_id] for agent_id in agent_ids}

    def _assets(self, session: Session, asset_ids: Collection[int]) -> dict[int, _AssetUnit]:
        """Symbol and decimals of `asset_ids`, remembered: an asset's never change once
        registered (models.registry refuses it) and an id is never reused."""
        missing = {a for a in asset_ids if a not in self._asset_units}
        if missing:
            self._asset_units.update(
                (row.id, _AssetUnit(row.symbol, row.decimals))
                for row in session.execute(
                    select(Asset.id, Asset.symbol, Asset.decimals).where(Asset.id.in_(missing))
                )
            )
        return {asset_id: self._asset_units[asset_id] for asset_id in asset_ids}

    # --- first sightings --------------------------------------------------------------

    def recorded(self, session: Session, deposit: Deposit) -> None:
        self.recorded_many(session, [StoredDeposit.of(deposit)])

    def recorded_many(self, session: Session, deposits: Sequence[StoredDeposit]) -> None:
        """Audit rows and events for a batch of new deposits, in a few set-based statements.

        Sightings of one chain share a stream: the chain's poller is the only writer, so it
        costs no contention, and one head lock covers the whole batch."""
        if not deposits:
            return
        assets = self._assets(session, {d.asset_id for d in deposits})
        agents = self._agents(session, {d.agent_id for d in deposits})
        for chain in sorted({d.chain for d in deposits}):
            entries = []
            for d in deposits:
                if d.chain != chain:
                    continue
                asset = assets[d.asset_id]
                amount = audit_amount(d.amount, asset.decimals, asset.symbol)
                entries.append(
                    audit.Entry(
                        actor="indexer",
                        action="deposit_seen",
                        asset=asset.symbol,
                        amount=amount,
                        details=_seen_details(d, amount),
                    )
                )
            audit.append_bulk(session, f"deposits-seen:{chain}", entries)
        events.emit_many(
            session,
            [
                ("deposit.pending", _event_data(d, assets[d.asset_id], agents[d.agent_id]))
                for d in deposits
            ],
        )

    # --- crediting, one deposit ---------------------------------------------------------

    def confirmed(self, session: Session, deposit: Deposit) -> None:
        """Credit one pending deposit (locked by the caller) through `ledger.post`."""
        assert deposit.status == DepositStatus.PENDING, "only pending deposits are confirmed"
        asset = session.get_one(Asset, deposit.asset_id)
        credit = plan_credit(
            deposit.amount, asset.decimals, asset.symbol, deposit.credited_base_units
        )
        row = _Row.of(deposit)
        stream = _stream(deposit.chain, deposit.id)
        entry = _conversion_entry(row, asset, credit)
        if entry is not None:
            audit.append_many(session, stream, [entry])
        if credit.post_units:
            generation = _generations(session, [deposit.id])[deposit.id]
            ledger.post(
                session,
                [
                    ledger.TransferSpec(
                        idempotency_key=_credit_key(deposit.chain, deposit.id, generation),
                        debit_account_id=accounts.custody(session, deposit.chain, asset.symbol).id,
                        credit_account_id=accounts.agent_available(
                            session, deposit.agent_id, asset.symbol
                        ).id,
                        amount=credit.post_units,
                        code=TransferCode.DEPOSIT,
                        ref_type="deposit",
                        ref_id=str(deposit.id),
                    )
                ],
                actor="indexer",
                audit_stream=stream,
            )
        for name, value in _confirmed_columns(credit).items():
            setattr(deposit, name, value)
        session.flush()
        agent = self._agents(session, [deposit.agent_id])[deposit.agent_id]
        events.emit(session, "deposit.confirmed", _event_data(_Row.of(deposit), asset, agent))
        _count(deposit.chain, asset.symbol, [credit])
        log.info(
            "deposit_credited",
            chain=deposit.chain,
            tx_hash=deposit.tx_hash,
            log_index=deposit.log_index,
            agent_id=deposit.agent_id,
            amount_base_units=deposit.amount,
            credited_base_units=credit.ledger_units,
            credit_state=credit.state.value,
            asset=asset.symbol,
        )

    # --- crediting, a whole pass ----------------------------------------------------------

    def confirmed_many(self, session: Session, deposits: Sequence[Finalized]) -> int:
        """Credit each deposit that is still pending at the block hash given, once, in the
        caller's transaction, in a few set-based statements: the ledger transfers, each
        agent account's credits summed once, the audit rows and the events. Deposits
        credited or orphaned meanwhile, or found at another block, are left alone.
        Returns how many were confirmed."""
        expected = {d.id: d.block_hash for d in deposits}
        if not expected:
            return 0
        session.flush()
        rows = [
            row for row in _pending(session, sorted(expected)) if expected[row.id] == row.block_hash
        ]
        if not rows:
            return 0
        assets = self._assets(session, {row.asset_id for row in rows})
        planned = [
            plan_credit(
                row.amount,
                assets[row.asset_id].decimals,
                assets[row.asset_id].symbol,
                row.credited_base_units,
            )
            for row in rows
        ]
        claimed = _claim(session, rows, planned)
        kept = [
            (row, credit) for row, credit in zip(rows, planned, strict=True) if row.id in claimed
        ]
        if not kept:
            return 0
        return self._credit(
            session, [row for row, _ in kept], [credit for _, credit in kept], assets
        )

    # --- crediting new deposits stored confirmed ------------------------------------------

    def final_columns(
        self, session: Session, deposits: Sequence[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """The columns `confirmed_many` would set on new deposits ((asset id, amount) each)
        that are final already, so a backfill window can store them confirmed."""
        assets = self._assets(session, {asset_id for asset_id, _ in deposits})
        return [
            _confirmed_columns(
                plan_credit(amount, assets[asset_id].decimals, assets[asset_id].symbol, 0)
            )
            for asset_id, amount in deposits
        ]

    def credited_new(self, session: Session, deposits: Sequence[StoredDeposit]) -> int:
        """Credit deposits this transaction has just inserted confirmed with `final_columns`
        (no other transaction can see them yet, so there is nothing to claim): the ledger
        transfers, audit rows and events `confirmed_many` writes. Returns how many."""
        if not deposits:
            return 0
        assets = self._assets(session, {d.asset_id for d in deposits})
        rows = [
            _Row(
                d.id,
                d.chain,
                d.tx_hash,
                d.log_index,
                d.asset_id,
                d.agent_id,
                d.amount,
                d.block_number,
                d.block_hash,
                _PENDING,
                _STATE_TEXT[DepositCreditState.NONE],
                0,
                0,
                None,
            )
            for d in deposits
        ]
        credits = [
            plan_credit(row.amount, assets[row.asset_id].decimals, assets[row.asset_id].symbol, 0)
            for row in rows
        ]
        return self._credit(session, rows, credits, assets)

    def _credit(
        self,
        session: Session,
        rows: Sequence[_Row],
        credits: Sequence[Credit],
        assets: dict[int, _AssetUnit],
    ) -> int:
        """Everything of a confirmation but the deposit rows' own columns, for `rows` (as
        read while pending) now confirmed with `credits`."""
        agents = self._agents(session, {row.agent_id for row in rows})
        conversions: dict[str, list[audit.Entry]] = {}
        for row, credit in zip(rows, credits, strict=True):
            entry = _conversion_entry(row, assets[row.asset_id], credit)
            if entry is not None:
                conversions[_stream(row.chain, row.id)] = [entry]
                log.warning(
                    "deposit_not_fully_credited",
                    chain=row.chain,
                    tx_hash=row.tx_hash,
                    log_index=row.log_index,
                    credit_state=credit.state.value,
                    dust_base_units=credit.dust_units,
                )
        audit.append_streams(session, conversions)
        self._post(session, rows, credits, assets)
        confirmed = [
            _Row(
                row.id,
                row.chain,
                row.tx_hash,
                row.log_index,
                row.asset_id,
                row.agent_id,
                row.amount,
                row.block_number,
                row.block_hash,
                _CONFIRMED,
                _STATE_TEXT[credit.state],
                credit.ledger_units,
                credit.dust_units,
                credit.note,
            )
            for row, credit in zip(rows, credits, strict=True)
        ]
        events.emit_many(
            session,
            [
                (
                    "deposit.confirmed",
                    _event_data(row, assets[row.asset_id], agents[row.agent_id]),
                )
                for row in confirmed
            ],
        )
        by_kind: dict[tuple[str, str], list[Credit]] = {}
        for row, credit in zip(rows, credits, strict=True):
            by_kind.setdefault((row.chain, assets[row.asset_id].symbol), []).append(credit)
        for (chain, symbol), kind_credits in by_kind.items():
            _count(chain, symbol, kind_credits)
        log.info(
            "deposits_credited",
            chains=sorted({row.chain for row in rows}),
            count=len(rows),
            credited_base_units=sum(credit.post_units for credit in credits),
        )
        return len(rows)

    @staticmethod
    def _post(
        session: Session,
        rows: Sequence[_Row],
        credits: Sequence[Credit],
        assets: dict[int, _AssetUnit],
    ) -> None:
        """One ledger transfer per deposit with something to post, custody -> agent."""
        to_post = [
            (row, credit) for row, credit in zip(rows, credits, strict=True) if credit.post_units
        ]
        if not to_post:
            return
        again = [
            row.id
            for row, _ in to_post
            if row.credit_state in (DepositCreditState.REVERSED, DepositCreditState.REVERSAL_SHORT)
        ]
        generations = _generations(session, again) if again else {}
        # Accounts created in the order the one-deposit path creates them: custody, then
        # each agent's as its first deposit comes.
        custody: dict[tuple[str, str], int] = {}
        agent_accounts: dict[str, dict[str, int]] = {}
        for symbol in sorted({assets[row.asset_id].symbol for row, _ in to_post}):
            mine = [
                (row.chain, row.agent_id)
                for row, _ in to_post
                if assets[row.asset_id].symbol == symbol
            ]
            for chain in dict.fromkeys(chain for chain, _ in mine):
                custody[chain, symbol] = accounts.custody(session, chain, symbol).id
            agent_accounts[symbol] = ledger.account_ids(
                session, AccountKind.AGENT_AVAILABLE, symbol, [str(agent) for _, agent in mine]
            )
        specs = []
        for row, credit in to_post:
            symbol = assets[row.asset_id].symbol
            specs.append(
                ledger.TransferSpec(
                    idempotency_key=_credit_key(row.chain, row.id, generations.get(row.id, 0)),
                    debit_account_id=custody[row.chain, symbol],
                    credit_account_id=agent_accounts[symbol][str(row.agent_id)],
                    amount=credit.post_units,
                    code=TransferCode.DEPOSIT,
                    ref_type="deposit",
                    ref_id=str(row.id),
                )
            )
        ledger.post_credits(
            session,
            specs,
            actor="indexer",
            audit_streams=[_stream(row.chain, row.id) for row, _ in to_post],
        )

    # --- reorgs ---------------------------------------------------------------------------

    def orphaned(self, session: Session, deposit: Deposit) -> None:
        """`deposit`'s block left the chain (the caller holds its row lock): mark it, and
        take back whatever of its credit stands, as far as the agent's balance allows."""
        asset = session.get_one(Asset, deposit.asset_id)
        standing = deposit.credited_base_units
        deposit.status = DepositStatus.ORPHANED
        session.flush()
        stream = _stream(deposit.chain, deposit.id)
        audit.append(
            session,
            stream=stream,
            actor="indexer",
            action="deposit_orphaned",
            asset=asset.symbol,
            amount=audit_amount(deposit.amount, asset.decimals, asset.symbol),
            details={"tx_hash": deposit.tx_hash, "block_hash": deposit.block_hash},
        )
        if standing:
            self._reverse(session, deposit, asset, standing)
        elif deposit.credit_state in (DepositCreditState.DUST, DepositCreditState.REFUSED):
            # Nothing was credited, and what was held on chain left with the block.
            deposit.credit_state = DepositCreditState.NONE.value
            deposit.dust_base_units = 0
            deposit.credit_note = None
            session.flush()
        agent = self._agents(session, [deposit.agent_id])[deposit.agent_id]
        events.emit(session, "deposit.orphaned", _event_data(_Row.of(deposit), asset, agent))

    def _reverse(self, session: Session, deposit: Deposit, asset: Asset, standing: int) -> None:
        # A reorg deeper than the confirmation depth took back money we already credited.
        log.error(
            "deep_reorg_credited_deposit_orphaned",
            chain=deposit.chain,
            tx_hash=deposit.tx_hash,
            agent_id=deposit.agent_id,
            amount_base_units=deposit.amount,
            credited_base_units=standing,
        )
        account = accounts.agent_available(session, deposit.agent_id, asset.symbol)
        # Locked before its balance is read, so what it covers cannot shrink meanwhile.
        session.execute(
            select(LedgerAccount.id).where(LedgerAccount.id == account.id).with_for_update()
        )
        reversible = max(0, min(standing, ledger.balance(session, account)))
        if reversible:
            generation = _generations(session, [deposit.id])[deposit.id]
            ledger.post(
                session,
                [
                    ledger.TransferSpec(
                        idempotency_key=(
                            f"deposit-reversal:{deposit.chain}:{deposit.id}:{generation}"
                        ),
                        debit_account_id=account.id,
                        credit_account_id=accounts.custody(session, deposit.chain, asset.symbol).id,
                        amount=reversible,
                        code=TransferCode.DEPOSIT_REVERSAL,
                        ref_type="deposit",
                        ref_id=str(deposit.id),
                    )
                ],
                actor="indexer",
                audit_stream=_stream(deposit.chain, deposit.id),
            )
        shortfall = standing - reversible
        deposit.credited_base_units = shortfall
        if shortfall == 0:
            deposit.credit_state = DepositCreditState.REVERSED.value
            deposit.credit_note = None
            deposit.credited, deposit.reversed = True, True
            session.flush()
            DEEP_REORG_REVERSALS.labels(deposit.chain, "reversed").inc()
            return
        deposit.credit_state = DepositCreditState.REVERSAL_SHORT.value
        deposit.credit_note = (
            f"reversal short by {shortfall} {asset.symbol} base units: the agent's balance "
            "no longer covered the orphaned credit, which stands for that much"
        )
        deposit.credited, deposit.reversed = True, False
        session.flush()
        DEEP_REORG_REVERSALS.labels(deposit.chain, "shortfall").inc()
        audit.append(
            session,
            stream=_stream(deposit.chain, deposit.id),
            actor="indexer",
            action="deposit_reversal_shortfall",
            asset=asset.symbol,
            amount=shortfall,
            details={
                "tx_hash": deposit.tx_hash,
                "reversed_base_units": reversible,
                "reason": "agent balance no longer covers the orphaned credit",
            },
        )
        log.error(
            "deposit_reversal_shortfall",
            chain=deposit.chain,
            tx_hash=deposit.tx_hash,
            agent_id=deposit.agent_id,
            reversed_base_units=reversible,
            shortfall_base_units=shortfall,
        )


def _confirmed_columns(credit: Credit) -> dict[str, Any]:
    """A deposit's columns once confirmed with `credit`."""
    credited = credit.state == DepositCreditState.CREDITED
    return {
        "status": _CONFIRMED,
        "credit_state": _STATE_TEXT[credit.state],
        "credited_base_units": credit.ledger_units,
        "dust_base_units": credit.dust_units,
        "credit_note": credit.note,
        "credited": credited,
        "reversed": False,
    }


def _count(chain: str, symbol: str, credits: Sequence[Credit]) -> None:
    credited = sum(1 for c in credits if c.state == DepositCreditState.CREDITED)
    if credited:
        DEPOSITS_CREDITED.labels(chain, symbol).inc(credited)
    refused = sum(1 for c in credits if c.state == DepositCreditState.REFUSED)
    if refused:
        DEPOSITS_UNCREDITED.labels(chain, "refused").inc(refused)
    dust = sum(1 for c in credits if c.dust_units)
    if dust:
        DEPOSITS_UNCREDITED.labels(chain, "dust").inc(dust)


# A join, not `id = ANY(...)`: the planner filters a status index scan by the array, a
# linear search per row (0.3 s for 10,000 deposits).
_PENDING_SQL = (
    "SELECT d.id, chain, tx_hash, log_index, asset_id, agent_id, amount, block_number, "
    "block_hash, status, credit_state, credited_base_units, dust_base_units, credit_note "
    "FROM deposits AS d JOIN unnest(%b::bigint[]) AS u (id) ON d.id = u.id "
    "WHERE status = 'pending' ORDER BY d.id"
)
# Confirms the rows still pending at the block hash and standing credit they were read
# with. A row another transaction holds is waited for, then checked again as that one
# left it (PostgreSQL re-evaluates the WHERE on the newest version), so of two passes
# racing for a deposit exactly one gets it back from RETURNING.
_CLAIM_SQL = """
UPDATE deposits AS d SET status = 'confirmed', credit_state = u.credit_state,
    credited_base_units = u.credited_base_units, dust_base_units = u.dust_base_units,
    credit_note = u.credit_note, credited = u.credit_state = 'credited', reversed = false,
    updated_at = %s
FROM unnest(%b::bigint[], %b::text[], %b::bigint[], %b::text[], %b::bigint[],
            %b::numeric(78, 0)[], %b::text[])
    AS u (id, block_hash, standing, credit_state, credited_base_units, dust_base_units,
          credit_note)
WHERE d.id = u.id AND d.status = 'pending' AND d.block_hash = u.block_hash
    AND d.credited_base_units = u.standing
RETURNING d.id
"""


def _pending(session: Session, deposit_ids: Sequence[int]) -> list[_Row]:
    """The deposits among `deposit_ids` that are pending, as read now (not locked)."""
    if session.get_bind().dialect.name == "postgresql":
        with driver_cursor(session) as cursor:
            cursor.execute(_PENDING_SQL, [list(deposit_ids)])
            return [
                _Row(i, c, tx, li, a, ag, int(amount), bn, bh, st, cs, int(cb), int(dust), note)
                for (i, c, tx, li, a, ag, amount, bn, bh, st, cs, cb, dust, note) in cursor
            ]
    rows: list[_Row] = []
    table = Deposit.metadata.tables[Deposit.__tablename__]
    columns = [table.c[name] for name in _Row._fields]
    for start in range(0, len(deposit_ids), IN_LIST_BATCH):
        rows.extend(
            _Row(*row)
            for row in session.execute(
                select(*columns)
                .where(
                    Deposit.id.in_(deposit_ids[start : start + IN_LIST_BATCH]),
                    Deposit.status == DepositStatus.PENDING,
                )
                .order_by(Deposit.id)
            )
        )
    return rows


def _claim(session: Session, rows: Sequence[_Row], credits: Sequence[Credit]) -> set[int]:
    """Confirm each deposit with its credit's columns if it is still as it was read; the
    ids confirmed. Everything else of the pass is written for these only."""
    if not rows:
        return set()
    now = utcnow()
    if session.get_bind().dialect.name != "postgresql":
        # SQLite: this transaction has held the one write lock since before the read.
        bulk.update_rows(
            session,
            Deposit.metadata.tables[Deposit.__tablename__],
            [
                {"id": row.id, **_confirmed_columns(credit), "updated_at": now}
                for row, credit in zip(rows, credits, strict=True)
            ],
        )
        return {row.id for row in rows}
    with driver_cursor(session) as cursor:
        cursor.execute(
            _CLAIM_SQL,
            [
                now,
                [row.id for row in rows],
                [row.block_hash for row in rows],
                [row.credited_base_units for row in rows],
                [credit.state.value for credit in credits],
                [credit.ledger_units for credit in credits],
                [credit.dust_units for credit in credits],
                [credit.note for credit in credits],
            ],
        )
        return {int(row[0]) for row in cursor}
