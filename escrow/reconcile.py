"""Reconciliation: what custody addresses hold on chain against what the ledger says.

Per (chain, asset), with ledger balances as credits - debits:

    held_by_ledger = -balance(custody(chain, asset))
    in_flight      = balance(payouts_in_flight(chain, asset))
    on_chain       = sum of the balances of the hot wallet and every deposit address

Custody's balance is minus the coins held (a deposit debits custody), so the ledger
holds ``-custody``. What the chain shows at one moment differs from that by what is on
its way, all of which escrowd knows about:

    expected = held_by_ledger
             + uncredited          deposits on chain, seen by the poller, not yet credited
             + settled_after_pin   payouts the ledger settled, mined after the block read
             - credited_after_pin  deposits credited, mined after the block read

A payout in flight is still in ``held_by_ledger`` until settled, but its transfer may
already have left, so the consistent range is

    expected - in_flight - may_have_left <= on_chain <= expected + may_have_arrived

and anything outside it is a difference (``on_chain - high`` above, ``on_chain - low``
below). With nothing under way this is plain equality.

**One moment per chain.** EVM balances are all read at one pinned block: the lower of the
node's head and the poller's cursor, so every deposit on chain at that block has been
seen by the poller (pending or credited) and a sweep (a transfer between two custody
addresses, ledger-neutral) counts once whether it is in the mempool or mined. Solana RPC
serves account state only at its current slot, so the balances are read twice at
`finalized` until both reads agree (no transfer landed between them); what escrowd saw
inside the slots of the read (deposits not finalized, payouts settled meanwhile) widens
the range instead, as do the fees and rent open Solana transactions may already have
paid (booked when they settle). Chain fees paid in an untracked coin (ETH gas) are not
compared.

Each chain is reconciled on its own: a chain whose node cannot be read is reported as
such and the others are still checked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import EvmChainSettings, Settings, SettingsError, SolanaSettings
from escrowd.escrow import accounts, ledger
from escrowd.escrow.money import to_chain_units
from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_source import EvmSource, JsonRpcEvmSource
from escrowd.indexer.solana_source import SolanaRpcSource, SolanaSource
from escrowd.models import (
    AccountKind,
    Agent,
    Asset,
    Chain,
    ChainCursor,
    Deposit,
    DepositAddress,
    DepositCreditState,
    DepositStatus,
    LedgerAccount,
    Payout,
    PayoutReason,
    PayoutStatus,
    TransferCode,
)
from escrowd.models.db import READ_ONLY_OPTION
from escrowd.models.registry import ledger_decimals

log = structlog.get_logger(__name__)

# (asset, addresses) -> total base units held by those addresses on chain.
BalanceReader = Callable[[Asset, Sequence[str]], int]

# eth_call balanceOf requests per JSON-RPC batch.
EVM_BATCH = 100
# Solana reads repeated until two agree; this many reads at most.
SOLANA_MAX_READS = 4
# What one Solana transaction can cost the hot wallet beyond its amount: two signatures'
# fees plus the rent of the destination's token account it may create.
SOLANA_FEE_LAMPORTS = 2 * 5_000
SPL_TOKEN_ACCOUNT_BYTES = 165
OPEN_PAYOUT_STATES = (
    PayoutStatus.REQUESTED.value,
    PayoutStatus.SIGNED.value,
    PayoutStatus.BROADCAST.value,
)


@dataclass(frozen=True)
class Difference:
    chain: str
    asset: str
    on_chain: int
    held_by_ledger: int
    in_flight: int
    difference: int

    def describe(self) -> str:
        return (
            f"{self.chain} {self.asset}: on chain {self.on_chain}, ledger holds "
            f"{self.held_by_ledger} with {self.in_flight} in flight: off by {self.difference}"
        )


@dataclass(frozen=True)
class Line:
    chain: str
    asset: str
    on_chain: int
    held_by_ledger: int
    in_flight: int
    uncredited: int = 0
    settled_after_pin: int = 0
    credited_after_pin: int = 0
    may_have_arrived: int = 0
    may_have_left: int = 0

    @property
    def expected(self) -> int:
        return (
            self.held_by_ledger + self.uncredited + self.settled_after_pin - self.credited_after_pin
        )

    @property
    def difference(self) -> int:
        high = self.expected + self.may_have_arrived
        if self.on_chain > high:
            return self.on_chain - high
        low = self.expected - self.in_flight - self.may_have_left
        return self.on_chain - low if self.on_chain < low else 0

    def describe(self) -> str:
        parts = [f"on chain {self.on_chain}", f"ledger holds {self.held_by_ledger}"]
        for label, value in (
            ("seen not yet credited", self.uncredited),
            ("settled after the block read", self.settled_after_pin),
            ("credited after the block read", -self.credited_after_pin),
            ("in flight", self.in_flight),
            ("may have arrived", self.may_have_arrived),
            ("fees in flight", self.may_have_left),
        ):
            if value or label == "in flight":
                parts.append(f"{label} {value}")
        verdict = "ok" if self.difference == 0 else f"off by {self.difference}"
        return f"{self.asset}: {', '.join(parts)}: {verdict}"


@dataclass(frozen=True)
class UncreditedDeposit:
    """A deposit on chain at the point read, seen by the poller, not yet credited."""

    chain: str
    asset: str
    tx_hash: str
    log_index: int
    amount: int
    block_number: int
    agent: str

    def describe(self) -> str:
        return (
            f"{self.chain} {self.asset} {self.amount} to {self.agent} in {self.tx_hash}"
            f"#{self.log_index} at {self.block_number}"
        )


@dataclass(frozen=True)
class ChainReport:
    """One chain's reconciliation, or why it could not be read (`error`)."""

    chain: str
    family: str
    at: str = ""
    lines: list[Line] = field(default_factory=list)
    uncredited: list[UncreditedDeposit] = field(default_factory=list)
    open_sweeps: int = 0
    error: str | None = None

    @property
    def differences(self) -> list[Difference]:
        return differences(self.lines)


@dataclass(frozen=True)
class Report:
    chains: list[ChainReport]

    @property
    def differences(self) -> list[Difference]:
        return [d for chain in self.chains for d in chain.differences]

    @property
    def unreadable(self) -> list[ChainReport]:
        return [chain for chain in self.chains if chain.error is not None]


@dataclass(frozen=True)
class HotWallets:
    evm: str
    solana: str


def custody_addresses(session: Session, family: str, hot_wallet: str) -> list[str]:
    """The hot wallet and every deposit address of a chain family ("evm" or "solana":
    one EVM deposit address serves every EVM network)."""
    deposit = session.scalars(
        select(DepositAddress.address)
        .where(DepositAddress.chain == family)
        .order_by(DepositAddress.id)
    ).all()
    return [hot_wallet, *deposit]


def _sum(session: Session, query: Any) -> int:
    return int(session.scalar(query) or 0)


def reconcile_chain(
    session: Session,
    *,
    chain: str,
    addresses: Sequence[str],
    read_balance: BalanceReader,
    at_block: int | None = None,
    bracket_to: int | None = None,
    assets: Sequence[Asset] | None = None,
) -> list[Line]:
    """One line per asset registered on `chain` (or per one of `assets`). `at_block`: the
    block (or finalized slot) the balances were read at, when known; `bracket_to`: for a
    read spread over slots `at_block..bracket_to`, the end of it (events inside are
    allowed either way)."""
    lines = []
    if assets is None:
        assets = list(session.scalars(select(Asset).where(Asset.chain == chain).order_by(Asset.id)))
    for asset in assets:
        on_chain = read_balance(asset, addresses)
        lines.append(
            _line(
                session,
                chain=chain,
                asset=asset,
                on_chain=on_chain,
                at_block=at_block,
                bracket_to=bracket_to,
            )
        )
    return lines


def _line(
    session: Session,
    *,
    chain: str,
    asset: Asset,
    on_chain: int,
    at_block: int | None,
    bracket_to: int | None,
) -> Line:
    """Everything in the chain token's base units: the ledger's amounts (at the ledger's
    scale) are converted exactly, and dust (below one ledger unit, never credited but held
    on chain) is added to what the addresses must hold."""
    scale = ledger_decimals(asset.symbol)

    def chain_units(ledger_amount: int) -> int:
        return to_chain_units(abs(ledger_amount), asset.decimals, scale) * (
            -1 if ledger_amount < 0 else 1
        )

    custody = ledger.find_account(session, AccountKind.CUSTODY, chain, asset.symbol)
    flight = ledger.find_account(session, AccountKind.PAYOUTS_IN_FLIGHT, chain, asset.symbol)
    deposits = _deposit_rows(session, chain, asset.id)
    pending = [d for d in deposits if d.status == PENDING]
    # Final deposits are on chain in full: the ledger holds their credit, and the rest
    # (dust below one ledger unit, or all of a refused one) stays there uncredited.
    final = [d for d in deposits if d.status == CONFIRMED]
    held_uncredited = sum(d.amount if d.credit_state == REFUSED else d.dust for d in final)
    settled = select(func.sum(Payout.amount)).where(
        Payout.chain == chain,
        Payout.asset_id == asset.id,
        Payout.status == PayoutStatus.CONFIRMED.value,
        Payout.reason != PayoutReason.SWEEP.value,
    )

    def amount(rows: Sequence[_DepositRow], low: int | None = None, high: int | None = None) -> int:
        return sum(
            d.amount
            for d in rows
            if (low is None or d.block_number > low) and (high is None or d.block_number <= high)
        )

    line = Line(
        chain=chain,
        asset=asset.symbol,
        on_chain=on_chain,
        held_by_ledger=chain_units(-ledger.balance(session, custody) if custody else 0)
        + held_uncredited,
        in_flight=chain_units(ledger.balance(session, flight) if flight else 0),
    )
    if at_block is None:
        return replace(line, uncredited=amount(pending))
    end = at_block if bracket_to is None else bracket_to
    return replace(
        line,
        uncredited=amount(pending, high=at_block),
        may_have_arrived=(amount(pending, low=at_block) if bracket_to is not None else 0)
        + chain_units(
            _sum(session, settled.where(Payout.block_number > at_block, Payout.block_number <= end))
        ),
        settled_after_pin=chain_units(_sum(session, settled.where(Payout.block_number > end))),
        credited_after_pin=amount(final, low=end),
        may_have_left=amount(final, low=at_block, high=end),
    )


PENDING = DepositStatus.PENDING.value
ORPHANED = DepositStatus.ORPHANED.value
CONFIRMED = DepositStatus.CONFIRMED.value
REFUSED = DepositCreditState.REFUSED.value


@dataclass(frozen=True, slots=True)
class _DepositRow:
    amount: int
    dust: int
    block_number: int
    status: str
    credit_state: str


def _deposit_rows(session: Session, chain: str, asset_id: int) -> list[_DepositRow]:
    """A chain's deposits of an asset, summed in Python: their amounts may exceed 64 bits
    and are text on SQLite, where SQL sums would go through floats."""
    return [
        _DepositRow(int(row.amount), int(row.dust_base_units), *row[2:])
        for row in session.execute(
            select(
                Deposit.amount,
                Deposit.dust_base_units,
                Deposit.block_number,
                Deposit.status,
                Deposit.credit_state,
            ).where(Deposit.chain == chain, Deposit.asset_id == asset_id)
        )
    ]


def differences(lines: Sequence[Line]) -> list[Difference]:
    return [
        Difference(
            chain=line.chain,
            asset=line.asset,
            on_chain=line.on_chain,
            held_by_ledger=line.held_by_ledger,
            in_flight=line.in_flight,
            difference=line.difference,
        )
        for line in lines
        if line.difference != 0
    ]


def _uncredited(session: Session, chain: str, at_block: int | None) -> list[UncreditedDeposit]:
    query = (
        select(Deposit, Asset.symbol, Agent.external_id)
        .join(Asset, Asset.id == Deposit.asset_id)
        .join(Agent, Agent.id == Deposit.agent_id)
        .where(
            Deposit.chain == chain,
            Deposit.status == DepositStatus.PENDING.value,
        )
        .order_by(Deposit.block_number, Deposit.id)
    )
    if at_block is not None:
        query = query.where(Deposit.block_number <= at_block)
    return [
        UncreditedDeposit(
            chain=chain,
            asset=symbol,
            tx_hash=deposit.tx_hash,
            log_index=deposit.log_index,
            amount=deposit.amount,
            block_number=deposit.block_number,
            agent=agent,
        )
        for deposit, symbol, agent in session.execute(query)
    ]


def _open_sweeps(session: Session, chain: str) -> int:
    return _sum(
        session,
        select(func.count()).where(
            Payout.chain == chain,
            Payout.reason == PayoutReason.SWEEP.value,
            Payout.status.in_(OPEN_PAYOUT_STATES),
        ),
    )


def record_operator_funding(
    session: Session, *, chain: str, asset: str, amount: int, reference: str
) -> None:
    """Book coins an operator put into a custody address outside any agent deposit (e.g.
    SOL for fees, a USDC float), so reconciliation expects them: custody -> operator
    funding."""
    ledger.post(
        session,
        [
            ledger.TransferSpec(
                idempotency_key=f"operator_funding:{chain}:{asset}:{reference}",
                debit_account_id=accounts.custody(session, chain, asset).id,
                credit_account_id=operator_funding_account(session, chain, asset).id,
                amount=amount,
                code=TransferCode.ADJUSTMENT,
                ref_type="operator_funding",
                ref_id=reference,
            )
        ],
        actor="operator",
    )


def record_operator_withdrawal(
    session: Session, *, chain: str, asset: str, amount: int, reference: str
) -> None:
    """Book coins an operator took out of a custody address (float no longer needed):
    operator funding -> custody, the reverse of `record_operator_funding`."""
    ledger.post(
        session,
        [
            ledger.TransferSpec(
                idempotency_key=f"operator_withdrawal:{chain}:{asset}:{reference}",
                debit_account_id=operator_funding_account(session, chain, asset).id,
                credit_account_id=accounts.custody(session, chain, asset).id,
                amount=amount,
                code=TransferCode.ADJUSTMENT,
                ref_type="operator_withdrawal",
                ref_id=reference,
            )
        ],
        actor="operator",
    )


def operator_funding_account(session: Session, chain: str, asset: str) -> LedgerAccount:
    return ledger.get_or_create_account(
        session, AccountKind.GENERAL, f"operator_funding:{chain}", asset
    )


def operator_float(session: Session, chain: str, asset: str) -> int:
    """What operators have booked into custody of (chain, asset) and not taken out."""
    account = ledger.find_account(session, AccountKind.GENERAL, f"operator_funding:{chain}", asset)
    return ledger.balance(session, account) if account is not None else 0


# --- reading the chains -------------------------------------------------------------------


@contextmanager
def snapshot(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A read-only session whose queries all see one committed state (PostgreSQL
    REPEATABLE READ; an SQLite read transaction is a snapshot by itself), so a deposit
    credited meanwhile is not counted both as uncredited and as held."""
    with sessions() as session, session.begin():
        options: dict[str, Any] = {READ_ONLY_OPTION: True}
        if session.get_bind().dialect.name == "postgresql":
            options["isolation_level"] = "REPEATABLE READ"
        session.connection(execution_options=options)
        yield session


def evm_balances_at(
    source: EvmSource, token: str | None, addresses: Sequence[str], block: int
) -> list[int]:
    """Each address's token (or, with no token, native) balance at `block`, in batches."""
    if not isinstance(source, JsonRpcEvmSource):
        # An in-process simulator (tests, `escrowd dev`) answers for its latest block
        # only; it moves only when told to mine.
        if token is None:
            return [source.native_balance_wei(a) for a in addresses]
        return [source.erc20_balance(token, a) for a in addresses]
    tag = hex(block)
    found: list[int] = []
    for start in range(0, len(addresses), EVM_BATCH):
        chunk = addresses[start : start + EVM_BATCH]
        calls: list[tuple[str, list[Any]]]
        if token is None:
            calls = [("eth_getBalance", [a, tag]) for a in chunk]
        else:
            calls = [("eth_call", [{"to": token, "data": _balance_of(a)}, tag]) for a in chunk]
        found += source.call_batch(calls, lambda results: [int(r, 16) for r in results])
    return found


def _balance_of(address: str) -> str:
    return "0x70a08231" + address.lower().removeprefix("0x").rjust(64, "0")


def _assets(session: Session, chain: str, configured: Sequence[Asset]) -> list[Asset]:
    """The chain's registered assets, and those configured but not registered yet (no
    poll so far): coins can be sent to a wallet before the first poll."""
    registered = list(session.scalars(select(Asset).where(Asset.chain == chain).order_by(Asset.id)))
    symbols = {asset.symbol for asset in registered}
    for asset in configured:
        if asset.symbol not in symbols:
            # Never added to the session: a stand-in to read balances with.
            registered.append(
                Asset(
                    chain=chain,
                    symbol=asset.symbol,
                    decimals=asset.decimals,
                    token_address=asset.token_address,
                )
            )
    return registered


def reconcile_evm(
    sessions: sessionmaker[Session], chain: EvmChainSettings, source: EvmSource, hot_wallet: str
) -> ChainReport:
    head = source.head()
    with sessions() as session:
        cursor = session.scalar(
            select(ChainCursor.block_number).where(
                ChainCursor.chain == chain.name, ChainCursor.key == ""
            )
        )
        addresses = custody_addresses(session, Chain.EVM.value, hot_wallet)
        assets = _assets(
            session,
            chain.name,
            [Asset(symbol="USDC", decimals=chain.usdc_decimals, token_address=chain.usdc_address)],
        )
    pin = head if cursor is None else min(head, cursor)
    balances = {
        asset.symbol: sum(evm_balances_at(source, asset.token_address, addresses, pin))
        for asset in assets
    }
    where = f"block {pin} (head {head}" + (", never scanned)" if cursor is None else ")")
    with snapshot(sessions) as session:
        return ChainReport(
            chain=chain.name,
            family=Chain.EVM.value,
            at=where,
            lines=reconcile_chain(
                session,
                chain=chain.name,
                addresses=addresses,
                read_balance=lambda asset, _: balances[asset.symbol],
                at_block=pin,
                assets=assets,
            ),
            uncredited=_uncredited(session, chain.name, pin),
            open_sweeps=_open_sweeps(session, chain.name),
        )


def _solana_read(
    source: SolanaSource, assets: Sequence[Asset], addresses: Sequence[str]
) -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for asset in assets:
        for address in addresses:
            if asset.token_address is None:
                found[asset.symbol, address] = source.get_balance(address, "finalized")
            else:
                found[asset.symbol, address] = sum(
                    account.amount_base_units
                    for account in source.get_token_accounts_by_owner(
                        address, asset.token_address, "finalized"
                    )
                )
    return found


def reconcile_solana(
    sessions: sessionmaker[Session], solana: SolanaSettings, source: SolanaSource, hot_wallet: str
) -> ChainReport:
    with sessions() as session:
        addresses = custody_addresses(session, Chain.SOLANA.value, hot_wallet)
        assets = _assets(
            session,
            solana.name,
            [
                Asset(symbol="SOL", decimals=9, token_address=None),
                Asset(symbol="USDC", decimals=6, token_address=solana.usdc_mint),
            ],
        )
    first_slot = source.get_slot("finalized")
    previous = _solana_read(source, assets, addresses)
    for _ in range(SOLANA_MAX_READS - 1):
        current = _solana_read(source, assets, addresses)
        if current == previous:
            break
        previous = current
    else:
        raise RpcError(f"balances kept changing over {SOLANA_MAX_READS} reads; run reconcile again")
    last_slot = source.get_slot("finalized")
    allowance = source.get_minimum_balance_for_rent_exemption(SPL_TOKEN_ACCOUNT_BYTES)
    allowance += SOLANA_FEE_LAMPORTS
    with snapshot(sessions) as session:
        lines = reconcile_chain(
            session,
            chain=solana.name,
            addresses=addresses,
            read_balance=lambda asset, _: sum(
                value for (symbol, _a), value in previous.items() if symbol == asset.symbol
            ),
            at_block=first_slot,
            bracket_to=last_slot,
            assets=assets,
        )
        open_transactions = _sum(
            session,
            select(func.count()).where(
                Payout.chain == solana.name,
                Payout.status.in_(OPEN_PAYOUT_STATES[1:]),
            ),
        )
        lines = [
            replace(line, may_have_left=line.may_have_left + open_transactions * allowance)
            if line.asset == "SOL"
            else line
            for line in lines
        ]
        return ChainReport(
            chain=solana.name,
            family=Chain.SOLANA.value,
            at=f"finalized slots {first_slot}-{last_slot}",
            lines=lines,
            uncredited=_uncredited(session, solana.name, first_slot),
            open_sweeps=_open_sweeps(session, solana.name),
        )


def configured_chains(settings: Settings) -> list[str]:
    names = [chain.name for chain in settings.evm_chains]
    if settings.solana is not None:
        names.append(settings.solana.name)
    return names


def reconcile_configured(
    sessions: sessionmaker[Session],
    settings: Settings,
    hot_wallets: HotWallets,
    *,
    chains: Sequence[str] | None = None,
    evm_sources: Mapping[str, EvmSource] | None = None,
    solana_source: SolanaSource | None = None,
) -> Report:
    """A report per configured chain (or those named), each read through the given
    source or one built from the chain's RPC settings. A chain that cannot be read is
    reported with its error; the others are still checked."""
    known = configured_chains(settings)
    unknown = [name for name in chains or () if name not in known]
    if unknown:
        raise SettingsError(
            f"unknown chain {', '.join(unknown)} (configured: {', '.join(known) or 'none'})"
        )
    selected = [name for name in known if chains is None or name in chains]
    reports = []
    for evm in settings.evm_chains:
        if evm.name not in selected:
            continue
        given = (evm_sources or {}).get(evm.name)
        reports.append(
            _guarded(
                evm.name,
                Chain.EVM.value,
                functools.partial(_with_evm_source, sessions, evm, given, hot_wallets.evm),
            )
        )
    solana = settings.solana
    if solana is not None and solana.name in selected:
        reports.append(
            _guarded(
                solana.name,
                Chain.SOLANA.value,
                functools.partial(
                    _with_solana_source, sessions, solana, solana_source, hot_wallets.solana
                ),
            )
        )
    return Report(reports)


def _with_evm_source(
    sessions: sessionmaker[Session],
    evm: EvmChainSettings,
    source: EvmSource | None,
    hot_wallet: str,
) -> ChainReport:
    if source is not None:
        return reconcile_evm(sessions, evm, source, hot_wallet)
    with JsonRpcEvmSource.for_chain(evm) as rpc:
        return reconcile_evm(sessions, evm, rpc, hot_wallet)


def _with_solana_source(
    sessions: sessionmaker[Session],
    solana: SolanaSettings,
    source: SolanaSource | None,
    hot_wallet: str,
) -> ChainReport:
    if source is not None:
        return reconcile_solana(sessions, solana, source, hot_wallet)
    with SolanaRpcSource(
        solana.rpc_urls, timeout_s=solana.rpc_timeout_s, max_rounds=solana.rpc_max_retries + 1
    ) as rpc:
        return reconcile_solana(sessions, solana, rpc, hot_wallet)


def _guarded(chain: str, family: str, run: Callable[[], ChainReport]) -> ChainReport:
    try:
        return run()
    except RpcError as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.warning("reconcile_chain_unreadable", chain=chain, error=error)
    except Exception as exc:
        # Not an RPC fault: a bug or a broken database; the traceback is for the log,
        # and the other chains are still reconciled.
        error = f"{type(exc).__name__}: {exc}"
        log.error("reconcile_chain_failed", chain=chain, error=error, exc_info=exc)
    return ChainReport(chain=chain, family=family, error=error)
