"""Escrow use cases: one function per use case over the caller's session.

The HTTP API, the CLI, the scheduler and `escrow.EscrowService` all call these; the
transaction boundary is the caller's. Every change posts its ledger transfers, appends an
audit row for the state change and writes a webhook event in that one transaction.

States: funded -> released | refunded | resolved, and funded -> expired -> refunded.
Terminal states (released, refunded, resolved) never change. A change locks the escrow
row first (SELECT ... FOR UPDATE), so two racing changes of one escrow serialize there and
the later one sees the new state and gets EscrowConflict.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import structlog
from sqlalchemy import Engine, and_, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, make_transient_to_detached

from escrowd.config.errors import ValidationFailed
from escrowd.config.settings import LEDGER_DECIMALS
from escrowd.escrow import accounts, apikeys, audit, events, ledger
from escrowd.escrow.errors import (
    AgentNotFound,
    EscrowConflict,
    EscrowNotFound,
    InsufficientFunds,
    InvalidAmount,
    UnknownAsset,
    WithdrawalNotFound,
)
from escrowd.escrow.money import to_ledger_units
from escrowd.escrow.payouts import PlatformAddresses, request_payout
from escrowd.escrow.uow import with_retries
from escrowd.models import (
    AccountKind,
    Agent,
    ApiScope,
    Asset,
    ChainCursor,
    Deposit,
    Escrow,
    EscrowStatus,
    LedgerAccount,
    Payout,
    PayoutReason,
    PayoutStatus,
    TransferCode,
    utcnow,
)
from escrowd.models.chain import PENDING_DEPOSIT_SQL
from escrowd.models.db import make_session_factory, prepared_rows, statement_rows
from escrowd.models.escrow import DUE_ESCROW_SQL, HELD_BY_PAYOUT_SQL, OPEN_ESCROW_STATES
from escrowd.models.registry import ledger_decimals

log = structlog.get_logger(__name__)

BPS_DENOMINATOR = 10_000
MAX_EXTERNAL_ID_LENGTH = 128
MAX_PAGE_SIZE = 1_000
# Payout states that hold nothing any more: the funds left on chain or came back.
PAYOUT_FINAL_STATES = (PayoutStatus.CONFIRMED, PayoutStatus.FAILED, PayoutStatus.CANCELLED)


# --- agents -------------------------------------------------------------------------------


def register_agent(session: Session, external_id: str, name: str | None = None) -> Agent:
    """The agent with this external id, created on first call (idempotent, race-safe).
    A later call with another name keeps the agent and updates its name."""
    if not external_id or len(external_id) > MAX_EXTERNAL_ID_LENGTH:
        raise ValidationFailed(f"agent id must be 1 to {MAX_EXTERNAL_ID_LENGTH} characters")
    query = select(Agent).where(Agent.external_id == external_id)
    agent = session.scalars(query).one_or_none()
    if agent is None:
        try:
            with session.begin_nested():
                agent = Agent(external_id=external_id, name=name)
                session.add(agent)
            log.info("agent_registered", agent_id=agent.id, external_id=external_id)
            return agent
        except IntegrityError:
            agent = session.scalars(query).one()
    if name is not None and agent.name != name:
        agent.name = name
        session.flush()
    return agent


def get_agent(session: Session, external_id: str) -> Agent:
    agent = session.scalars(select(Agent).where(Agent.external_id == external_id)).one_or_none()
    if agent is None:
        raise AgentNotFound(f"no agent {external_id!r}; register it with POST /v1/agents first")
    return agent


# Registered assets never change their decimals (models.registry refuses it), so a known
# symbol's decimals can be remembered for the life of the process.
_decimals_cache: dict[str, int] = {}


def asset_decimals(session: Session, symbol: str) -> int:
    """Decimals of a ledger asset's base unit: the ledger's one scale for it, whatever
    decimals its token has on each chain (models.registry)."""
    cached = _decimals_cache.get(symbol)
    if cached is not None:
        return cached
    registered = session.scalars(
        select(Asset.id).where(Asset.symbol == symbol).limit(1)
    ).one_or_none()
    if registered is None or symbol not in LEDGER_DECIMALS:
        raise UnknownAsset(f"unknown asset {symbol!r}; use a configured asset such as USDC")
    decimals = ledger_decimals(symbol)
    _decimals_cache[symbol] = decimals
    return decimals


def _accounts(
    session: Session, asset: str, wanted: Sequence[tuple[AccountKind, str]]
) -> dict[tuple[AccountKind, str], LedgerAccount]:
    """Several accounts of one asset in one SELECT; missing ones are created."""
    found = {
        (AccountKind(account.kind), account.owner): account
        for account in session.scalars(
            select(LedgerAccount).where(
                LedgerAccount.asset == asset,
                or_(
                    *(
                        and_(LedgerAccount.kind == kind.value, LedgerAccount.owner == owner)
                        for kind, owner in wanted
                    )
                ),
            )
        )
    }
    for kind, owner in wanted:
        if (kind, owner) not in found:
            found[kind, owner] = ledger.get_or_create_account(session, kind, owner, asset)
    return found


@dataclass(frozen=True)
class AssetBalance:
    asset: str
    decimals: int
    available: int
    escrowed_as_buyer: int
    # Seen on chain, not yet confirmed: becomes available when credited.
    incoming: int = 0
    # Held for payouts that are neither confirmed nor failed.
    pending_withdrawals: int = 0


def balances(session: Session, agent: Agent) -> list[AssetBalance]:
    """Per asset: what the agent can spend, what it has locked in open escrows, what is
    on its way in (pending deposits) and what is on its way out (open payouts)."""
    # Agent accounts are no-overdraft ones, whose row holds the balance and what the
    # agent's open escrows hold. Deposits and payouts are read through partial indexes of
    # the live ones, whose conditions the queries state as written (migration 0020).
    accounts = session.execute(
        select(
            LedgerAccount.asset,
            LedgerAccount.credits_posted - LedgerAccount.debits_posted,
            LedgerAccount.escrowed,
        ).where(
            LedgerAccount.kind == AccountKind.AGENT_AVAILABLE.value,
            LedgerAccount.owner == str(agent.id),
        )
    ).all()
    available = {asset: int(posted) for asset, posted, _ in accounts}
    escrowed = {asset: int(held) for asset, _, held in accounts if held}
    pending = session.execute(
        select(Asset.symbol, Asset.decimals, Deposit.amount)
        .join(Asset, Asset.id == Deposit.asset_id)
        .where(Deposit.agent_id == agent.id, text(PENDING_DEPOSIT_SQL))
    )
    outgoing = {
        symbol: int(total)
        for symbol, total in session.execute(
            select(Asset.symbol, func.sum(Payout.amount))
            .join(Asset, Asset.id == Payout.asset_id)
            .where(Payout.agent_id == agent.id, text(HELD_BY_PAYOUT_SQL))
            .group_by(Asset.symbol)
        )
    }
    return _assemble_balances(session, available, escrowed, pending, outgoing)


def _assemble_balances(
    session: Session | None,
    available: Mapping[str, int],
    escrowed: Mapping[str, int],
    pending: Iterable[Sequence[Any]],
    outgoing: Mapping[str, int],
) -> list[AssetBalance]:
    incoming: dict[str, int] = {}
    # Summed here, not in SQL: amounts can exceed 64 bits and SQLite stores them as text.
    for symbol, token_decimals, amount in pending:
        decimals = ledger_decimals(symbol) if session is None else asset_decimals(session, symbol)
        units, _ = to_ledger_units(int(amount), token_decimals, decimals)
        incoming[symbol] = incoming.get(symbol, 0) + units
    return [
        AssetBalance(
            asset=symbol,
            decimals=LEDGER_DECIMALS.get(symbol, 0),
            available=available.get(symbol, 0),
            escrowed_as_buyer=escrowed.get(symbol, 0),
            incoming=incoming.get(symbol, 0),
            pending_withdrawals=outgoing.get(symbol, 0),
        )
        for symbol in sorted(set(available) | set(escrowed) | set(incoming) | set(outgoing))
    ]


# `balances` of an agent named by its external id, as one statement (PostgreSQL): the
# agent's marker row, then one row per available account (with what open escrows hold),
# pending deposit and open payout sum. Agent accounts are no-overdraft ones, whose row
# holds the balance. The states are those of `balances` (PENDING_DEPOSIT_SQL,
# HELD_BY_PAYOUT_SQL, the conditions of the partial indexes that serve them);
# tests/test_api_fast.py compares both paths.
PG_BALANCES = """
WITH a AS (SELECT id FROM agents WHERE external_id = %s)
SELECT 'agent', NULL::text, NULL::bigint, a.id::numeric FROM a
UNION ALL
SELECT 'available', la.asset, la.escrowed, (la.credits_posted - la.debits_posted)::numeric
FROM ledger_accounts la JOIN a ON la.owner = a.id::text
WHERE la.kind = 'agent_available'
UNION ALL
SELECT 'incoming', s.symbol, s.decimals, d.amount::numeric
FROM deposits d JOIN a ON d.agent_id = a.id JOIN assets s ON s.id = d.asset_id
WHERE d.status = 'pending'
UNION ALL
SELECT 'outgoing', s.symbol, NULL, sum(p.amount)::numeric
FROM payouts p JOIN a ON p.agent_id = a.id JOIN assets s ON s.id = p.asset_id
WHERE p.reason <> 'sweep' AND p.status NOT IN ('confirmed', 'failed', 'cancelled')
GROUP BY s.symbol
"""


def balances_of_rows(external_id: str, rows: Sequence[Sequence[Any]]) -> list[AssetBalance]:
    """`balances` from the rows of PG_BALANCES (its parameter: the external id), a read
    with no transaction on PostgreSQL: one autocommit statement where the session path
    takes six."""
    if not rows or rows[0][0] != "agent":
        raise AgentNotFound(f"no agent {external_id!r}; register it with POST /v1/agents first")
    parts: dict[str, dict[str, int]] = {"available": {}, "escrowed": {}, "outgoing": {}}
    pending = []
    for kind, symbol, number, amount in rows[1:]:
        if kind == "incoming":
            # number: the token's decimals.
            pending.append((symbol, number, amount))
            continue
        parts[kind][symbol] = int(amount)
        if kind == "available" and number:
            # number: what the agent's open escrows hold.
            parts["escrowed"][symbol] = int(number)
    return _assemble_balances(
        None, parts["available"], parts["escrowed"], pending, parts["outgoing"]
    )


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValidationFailed(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}")


def list_deposits(
    session: Session,
    *,
    agent: Agent | None = None,
    chain: str | None = None,
    status: str | None = None,
    after_id: int | None = None,
    limit: int = 100,
) -> Sequence[Deposit]:
    """Deposits in id order after `after_id` (the cursor), at most `limit`; `chain` is
    the network name."""
    _check_limit(limit)
    query = select(Deposit).order_by(Deposit.id).limit(limit)
    if agent is not None:
        query = query.where(Deposit.agent_id == agent.id)
    if chain is not None:
        query = query.where(Deposit.chain == chain)
    if status is not None:
        query = query.where(Deposit.status == status)
    if after_id is not None:
        query = query.where(Deposit.id > after_id)
    return session.scalars(query).all()


# --- withdrawals (reads) ------------------------------------------------------------------


def list_withdrawals(
    session: Session,
    *,
    agent: Agent | None = None,
    network: str | None = None,
    status: str | None = None,
    after_id: int | None = None,
    limit: int = 100,
) -> Sequence[Payout]:
    """Payouts to agents (withdrawals, and escrow releases or refunds paid on chain) in id
    order after `after_id`, at most `limit`. Sweeps are custody moves and not listed."""
    _check_limit(limit)
    query = (
        select(Payout)
        .where(Payout.reason != PayoutReason.SWEEP.value)
        .order_by(Payout.id)
        .limit(limit)
    )
    if agent is not None:
        query = query.where(Payout.agent_id == agent.id)
    if network is not None:
        query = query.where(Payout.chain == network)
    if status is not None:
        query = query.where(Payout.status == status)
    if after_id is not None:
        query = query.where(Payout.id > after_id)
    return session.scalars(query).all()


def get_withdrawal(session: Session, payout_id: int) -> Payout:
    payout = session.get(Payout, payout_id)
    if payout is None or payout.reason == PayoutReason.SWEEP.value:
        raise WithdrawalNotFound(f"no withdrawal {payout_id}; GET /v1/withdrawals lists them")
    return payout


def scanned_blocks(session: Session, networks: Sequence[str]) -> dict[str, int]:
    """The newest block escrowd's poller scanned on each of these EVM networks."""
    if not networks:
        return {}
    rows = session.execute(
        select(ChainCursor.chain, ChainCursor.block_number).where(
            ChainCursor.chain.in_(networks),
            ChainCursor.key == "",
            ChainCursor.block_number.is_not(None),
        )
    )
    return {chain: block for chain, block in rows.all() if block is not None}


# --- escrows ------------------------------------------------------------------------------


def fee_for(amount: int, fee_bps: int) -> int:
    """The platform fee: floor(amount * fee_bps / 10000). Rounding favours the worker:
    the remainder of the division stays with the worker, so 1 base unit at 250 bps has
    fee 0 and 999_999 at 333 bps has fee 33_299 (worker 966_700)."""
    assert amount >= 0 and 0 <= fee_bps <= BPS_DENOMINATOR
    return amount * fee_bps // BPS_DENOMINATOR


def _insert_for(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _stream(job_id: str) -> str:
    return f"escrow:{job_id}"


# The refusals of the escrow operations, worded once for the Python and database paths.
def _no_escrow(job_id: str) -> EscrowNotFound:
    return EscrowNotFound(f"no escrow for job {job_id!r}")


def _job_taken(job_id: str, status: str) -> EscrowConflict:
    return EscrowConflict(f"escrow {job_id} already exists ({status}); use a new job id")


def _settled_already(job_id: str, status: str, verb: str) -> EscrowConflict:
    return EscrowConflict(f"escrow {job_id} is already {status}; it cannot be {verb}")


def _share_out_of_range(worker_gross: int | None, amount: int | str) -> InvalidAmount:
    return InvalidAmount(
        f"worker amount {worker_gross} must be between 0 and the escrowed {amount}"
    )


def get_escrow(session: Session, job_id: str) -> Escrow:
    escrow = session.scalars(select(Escrow).where(Escrow.job_id == job_id)).one_or_none()
    if escrow is None:
        raise _no_escrow(job_id)
    return escrow


def _lock_escrow(session: Session, job_id: str) -> tuple[Escrow, Agent, Agent]:
    """The escrow row, locked until commit, with both agents loaded in the same query."""
    buyer, worker = aliased(Agent), aliased(Agent)
    row = session.execute(
        select(Escrow, buyer, worker)
        .join(buyer, buyer.id == Escrow.buyer_agent_id)
        .join(worker, worker.id == Escrow.worker_agent_id)
        .where(Escrow.job_id == job_id)
        .with_for_update(of=Escrow)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if row is None:
        raise _no_escrow(job_id)
    return row[0], row[1], row[2]


def _event_data(escrow: Escrow, buyer: Agent, worker: Agent) -> dict[str, object]:

    def units(value: int | None) -> str | None:
        return None if value is None else str(value)

    return {
        "job_id": escrow.job_id,
        "status": escrow.status,
        "buyer": buyer.external_id,
        "worker": worker.external_id,
        "asset": escrow.asset,
        "amount_base_units": str(escrow.amount),
        "fee_bps": escrow.fee_bps,
        "worker_amount_base_units": units(escrow.worker_amount),
        "fee_amount_base_units": units(escrow.fee_amount),
        "refund_amount_base_units": units(escrow.refund_amount),
    }


def _record(
    session: Session, escrow: Escrow, parties: tuple[Agent, Agent], action: str, actor: str
) -> None:
    """The audit row and webhook event of a state change."""
    audit.append(
        session,
        stream=_stream(escrow.job_id),
        actor=actor,
        action=action,
        asset=escrow.asset,
        amount=escrow.amount,
        details={
            "status": escrow.status,
            "worker_amount": escrow.worker_amount,
            "fee_amount": escrow.fee_amount,
            "refund_amount": escrow.refund_amount,
        },
    )
    events.emit(session, f"escrow.{escrow.status}", _event_data(escrow, *parties))


def fund_escrow(
    session: Session,
    *,
    job_id: str,
    buyer: Agent,
    worker: Agent,
    asset: str,
    amount: int,
    fee_bps: int,
    expires_at: datetime | None = None,
    actor: str = "api",
) -> Escrow:
    """Move `amount` from the buyer's available balance into a new escrow for `job_id`.
    One escrow per job id: a second fund of the same job is EscrowConflict."""
    request = _Funding(job_id, buyer, worker, asset, amount, fee_bps, expires_at, actor)
    request.check()
    asset_decimals(session, asset)
    if _in_database(session):
        return _attach(session, request.funded(_call_escrow_function(session, *request.call())))
    # The unique job id decides, also between concurrent funds of one job: the loser's
    # insert waits for the winner's commit and then inserts nothing.
    now = utcnow()
    escrow: Escrow | None = session.scalars(
        _insert_for(session)(Escrow)
        .values(
            job_id=job_id,
            buyer_agent_id=buyer.id,
            worker_agent_id=worker.id,
            asset=asset,
            amount=amount,
            fee_bps=fee_bps,
            status=EscrowStatus.FUNDED.value,
            expires_at=expires_at,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["job_id"])
        .returning(Escrow)
    ).one_or_none()
    if escrow is None:
        status = session.scalars(select(Escrow.status).where(Escrow.job_id == job_id)).one()
        raise _job_taken(job_id, status)
    funding = _accounts(
        session, asset, [(AccountKind.AGENT_AVAILABLE, str(buyer.id)), (AccountKind.ESCROW, job_id)]
    )
    try:
        ledger.post(
            session,
            [
                ledger.TransferSpec(
                    idempotency_key=f"escrow:{job_id}:fund",
                    debit_account_id=funding[AccountKind.AGENT_AVAILABLE, str(buyer.id)].id,
                    credit_account_id=funding[AccountKind.ESCROW, job_id].id,
                    amount=amount,
                    code=TransferCode.ESCROW_FUND,
                    ref_type="escrow",
                    ref_id=job_id,
                )
            ],
            actor=actor,
            audit_stream=_stream(job_id),
        )
    except InsufficientFunds:
        raise _buyer_short(buyer, amount, asset) from None
    _hold(session, buyer.id, asset, amount)
    _record(session, escrow, (buyer, worker), "escrow_funded", actor)
    log.info("escrow_funded", job_id=job_id, asset=asset, amount_base_units=amount)
    return escrow


@dataclass(frozen=True)
class _Funding:
    """One fund_escrow request, for both database paths."""

    job_id: str
    buyer: Agent
    worker: Agent
    asset: str
    amount: int
    fee_bps: int
    expires_at: datetime | None
    actor: str

    def check(self) -> None:
        job_id, amount, fee_bps = self.job_id, self.amount, self.fee_bps
        if not job_id or len(job_id) > MAX_EXTERNAL_ID_LENGTH:
            raise ValidationFailed(f"job id must be 1 to {MAX_EXTERNAL_ID_LENGTH} characters")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise InvalidAmount(f"escrow amount must be a positive integer, got {amount!r}")
        if not 0 <= fee_bps <= BPS_DENOMINATOR:
            raise ValidationFailed(f"fee_bps must be between 0 and 10000, got {fee_bps}")
        if self.buyer.id == self.worker.id:
            raise ValidationFailed("buyer and worker must be different agents")
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValidationFailed("expires_at must carry a timezone (UTC)")

    def call(self) -> tuple[Any, ...]:
        """escrowd_fund_escrow's statement and arguments."""
        return (
            _PG_FUND,
            self.job_id,
            self.buyer.id,
            self.worker.id,
            self.asset,
            self.amount,
            self.fee_bps,
            self.expires_at,
            self.actor,
        )

    def funded(self, result: tuple[str, Any, Any]) -> Mapping[str, Any]:
        """The new escrow's row from the function's result, or its refusal raised."""
        outcome, detail, row = result
        if outcome == "conflict":
            raise _job_taken(self.job_id, detail)
        if outcome == "insufficient_funds":
            raise _buyer_short(self.buyer, self.amount, self.asset)
        ledger.raise_refusal(outcome, detail)
        assert outcome == "funded", outcome
        log.info(
            "escrow_funded", job_id=self.job_id, asset=self.asset, amount_base_units=self.amount
        )
        funded: Mapping[str, Any] = row
        return funded


def _buyer_short(buyer: Agent, amount: int, asset: str) -> InsufficientFunds:
    return InsufficientFunds(
        f"buyer {buyer.external_id} has less than {amount} base units of {asset} "
        "available; deposit more or fund a smaller amount"
    )


# --- PostgreSQL: one round trip per escrow operation (functions of migrations 0003-0004) -

_PG_FUND = (
    "SELECT outcome, detail, escrow FROM escrowd_fund_escrow(%s::text, %s::bigint, "
    "%s::bigint, %s::text, %s::bigint, %s::int, %s::timestamptz, %s::text, %s::text, "
    "%s::timestamptz, %s::text, %s::text)"
)
_PG_SETTLE = (
    "SELECT outcome, detail, escrow FROM escrowd_settle_escrow(%s::text, %s::text, "
    "%s::text[], %s::bigint, %s::text, %s::text, %s::timestamptz, %s::text, %s::text)"
)
_TIMESTAMP_COLUMNS = ("expires_at", "resolved_at", "created_at", "updated_at")


def _in_database(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _escrow_of(row: Mapping[str, Any]) -> Escrow:
    """The escrow as the function returned it (row_to_json), as a detached object. Its
    values go into the instance dict, which is how the ORM's own loader stores a fetched
    row; the constructor and merge(), or set_committed_value per column, cost several
    times more client CPU."""
    values = dict(row)
    for column in _TIMESTAMP_COLUMNS:
        raw = values[column]
        if raw is not None:
            values[column] = datetime.fromisoformat(raw).astimezone(UTC)
    escrow: Escrow = Escrow.__mapper__.class_manager.new_instance()
    escrow.__dict__.update(values)
    make_transient_to_detached(escrow)
    return escrow


def _attach(session: Session, row: Mapping[str, Any]) -> Escrow:
    """`_escrow_of` made the session's persistent object without another query."""
    escrow = _escrow_of(row)
    if session.identity_map.get(session.identity_key(Escrow, escrow.id)) is not None:
        return session.merge(escrow, load=False)
    session.add(escrow)
    return escrow


def _function_params(*args: Any) -> tuple[Any, ...]:
    """The escrow functions' arguments followed by the batch id, the time (as a value and
    as the audit trail's text) and the webhook API version they all take."""
    now = utcnow()
    return (*args, str(uuid.uuid4()), now, audit.timestamp_text(now), events.API_VERSION)


def _call_escrow_function(session: Session, sql: str, *args: Any) -> tuple[str, Any, Any]:
    # The function's SQL does not autoflush; the caller's pending ORM writes land first.
    session.flush()
    outcome, detail, row = prepared_rows(session, sql, _function_params(*args))[0]
    return outcome, detail, row


def _call_alone(engine: Engine, sql: str, *args: Any) -> tuple[str, Any, Any]:
    """An escrow function call as a transaction of its own (autocommit, one round trip),
    retried on deadlock or serialization failure."""
    params = _function_params(*args)
    outcome, detail, row = with_retries(lambda: statement_rows(engine, sql, params)[0])
    return outcome, detail, row


# --- PostgreSQL: the HTTP API's idempotent escrow calls, one statement each (0017) -------

_API_RESULT = (
    "SELECT outcome, detail, body, worker_amount, fee_amount, refund_amount, stored_hash, "
    "stored_status, stored_body, stored_method, stored_path FROM "
)


def _array(values: Iterable[object]) -> str:
    return "'{" + ",".join(str(value) for value in values) + "}'"


# The key check (escrowd_api_key_holds: the scopes that may write are constants of the
# statement), the idempotency record's columns, then each ledger asset's decimals for the
# response PostgreSQL renders, also constants (parameters dumped at every call cost more).
_API_ARGS = (
    f"%s::text, %s::text, {_array(apikeys.scopes_allowing(ApiScope.WRITE))}::text[], "
    "%s::int, %s::int, %s::int, %s::int, %s::text, %s::text, %s::text, %s::text, %s::text, "
    f"%s::int, {_array(LEDGER_DECIMALS)}::text[], {_array(LEDGER_DECIMALS.values())}::int[], "
)
PG_API_FUND = (
    _API_RESULT + "escrowd_api_fund_escrow(" + _API_ARGS + "%s::text, %s::bigint, %s::bigint, "
    "%s::text, %s::bigint, %s::int, %s::timestamptz, %s::text, %s::text, %s::timestamptz, "
    "%s::text, %s::text)"
)
PG_API_SETTLE = (
    _API_RESULT + "escrowd_api_settle_escrow(" + _API_ARGS + "%s::text, %s::text, "
    "%s::text[], %s::bigint, %s::text, %s::text, %s::timestamptz, %s::text, %s::text)"
)


def checked_funding(
    *,
    job_id: str,
    buyer: Agent,
    worker: Agent,
    asset: str,
    amount: int,
    fee_bps: int,
    expires_at: datetime | None,
    actor: str,
) -> _Funding:
    """A fund_escrow request whose arguments passed fund_escrow's checks."""
    request = _Funding(job_id, buyer, worker, asset, amount, fee_bps, expires_at, actor)
    request.check()
    return request


def api_fund_params(
    key_check: tuple[Any, ...], record: tuple[Any, ...], request: _Funding
) -> tuple[Any, ...]:
    """PG_API_FUND's arguments: the key check (its 6 values, all None when the caller's
    key was checked before), the idempotency record (principal, key, method, path, request
    hash, response status) and the escrowd_fund_escrow call."""
    return (*key_check, *record, *_function_params(*request.call()[1:]))


def api_funded(request: _Funding, outcome: str, detail: str | None) -> None:
    """A PG_API_FUND outcome: logged when funded, its refusal raised."""
    request.funded((outcome, detail, None))


def api_release_params(
    key_check: tuple[Any, ...], record: tuple[Any, ...], job_id: str, actor: str
) -> tuple[Any, ...]:
    """PG_API_SETTLE's arguments for a release, as api_fund_params'."""
    call = _settle_call(job_id, RELEASE, None, actor)[1:]
    return (*key_check, *record, *_function_params(*call))


def api_released(job_id: str, outcome: str, detail: str | None, amounts: Sequence[Any]) -> None:
    """A PG_API_SETTLE outcome of a release: logged when settled (amounts: the worker's,
    the fee and the refund), its refusal raised."""
    _settled_row((outcome, detail, None), job_id, RELEASE, None)
    worker, fee, refund = amounts
    log.info(
        f"escrow_{EscrowStatus.RELEASED.value}",
        job_id=job_id,
        worker_amount_base_units=worker,
        fee_amount_base_units=fee,
        refund_amount_base_units=refund,
    )


def fund_escrow_alone(
    engine: Engine,
    *,
    job_id: str,
    buyer: Agent,
    worker: Agent,
    asset: str,
    amount: int,
    fee_bps: int,
    expires_at: datetime | None = None,
    actor: str = "api",
) -> Escrow:
    """`fund_escrow` as a transaction of its own on PostgreSQL: the escrowd_fund_escrow
    call in autocommit, one round trip where BEGIN, the call and COMMIT take three.
    Returns the escrow detached."""
    request = _Funding(job_id, buyer, worker, asset, amount, fee_bps, expires_at, actor)
    request.check()
    if asset not in _decimals_cache:
        with make_session_factory(engine, read_only=True)() as session:
            asset_decimals(session, asset)
    return _escrow_of(request.funded(_call_alone(engine, *request.call())))


class Settlement(NamedTuple):
    """How release, refund and resolve settle an escrow."""

    new_status: EscrowStatus
    allowed: tuple[EscrowStatus, ...]
    verb: str


RELEASE = Settlement(EscrowStatus.RELEASED, (EscrowStatus.FUNDED,), "released")
REFUND = Settlement(EscrowStatus.REFUNDED, OPEN_ESCROW_STATES, "refunded")
RESOLVE = Settlement(EscrowStatus.RESOLVED, (EscrowStatus.FUNDED,), "resolved")


def _settle_call(
    job_id: str, how: Settlement, worker_gross: int | None, actor: str
) -> tuple[Any, ...]:
    allowed = [status.value for status in how.allowed]
    return (_PG_SETTLE, job_id, how.new_status.value, allowed, worker_gross, actor)


def _settled_row(
    result: tuple[str, Any, Any], job_id: str, how: Settlement, worker_gross: int | None
) -> Mapping[str, Any]:
    outcome, detail, row = result
    if outcome == "not_found":
        raise _no_escrow(job_id)
    if outcome == "conflict":
        raise _settled_already(job_id, detail, how.verb)
    if outcome == "invalid_amount":
        raise _share_out_of_range(worker_gross, detail)
    assert outcome == "settled", outcome
    row_: Mapping[str, Any] = row
    return row_


def _settle_in_database(
    session: Session, job_id: str, how: Settlement, *, worker_gross: int | None, actor: str
) -> Escrow:
    result = _call_escrow_function(session, *_settle_call(job_id, how, worker_gross, actor))
    escrow = _attach(session, _settled_row(result, job_id, how, worker_gross))
    _log_settled(escrow)
    return escrow


def settle_escrow_alone(
    engine: Engine,
    job_id: str,
    how: Settlement,
    *,
    worker_amount: int | None = None,
    actor: str = "api",
) -> Escrow:
    """`release_escrow` (RELEASE), `refund_escrow` (REFUND) or `resolve_escrow` (RESOLVE,
    with `worker_amount`) as a transaction of its own on PostgreSQL: the
    escrowd_settle_escrow call in autocommit, one round trip. Returns the escrow detached."""
    worker_gross = _worker_gross(how, worker_amount)
    result = _call_alone(engine, *_settle_call(job_id, how, worker_gross, actor))
    escrow = _escrow_of(_settled_row(result, job_id, how, worker_gross))
    _log_settled(escrow)
    return escrow


def _worker_gross(how: Settlement, worker_amount: int | None) -> int | None:
    """The worker's gross share a settlement pays: None (the whole amount) for a release,
    0 for a refund, `worker_amount` for a resolution."""
    if how is RELEASE:
        return None
    if how is REFUND:
        return 0
    if isinstance(worker_amount, bool) or not isinstance(worker_amount, int):
        raise InvalidAmount(f"worker amount must be an integer, got {worker_amount!r}")
    return worker_amount


def _log_settled(escrow: Escrow) -> None:
    log.info(
        f"escrow_{escrow.status}",
        job_id=escrow.job_id,
        worker_amount_base_units=escrow.worker_amount,
        fee_amount_base_units=escrow.fee_amount,
        refund_amount_base_units=escrow.refund_amount,
    )


def _settle(
    session: Session,
    escrow: Escrow,
    parties: tuple[Agent, Agent],
    *,
    worker_gross: int,
    new_status: EscrowStatus,
    actor: str,
) -> Escrow:
    """Pay `worker_gross` minus its fee to the worker, the fee to the platform and the
    rest back to the buyer; zero-amount legs are skipped."""
    assert escrow.status in OPEN_ESCROW_STATES
    assert 0 <= worker_gross <= escrow.amount
    fee = fee_for(worker_gross, escrow.fee_bps)
    worker_net = worker_gross - fee
    refund = escrow.amount - worker_gross
    job_id, asset = escrow.job_id, escrow.asset
    legs = [
        (
            "worker",
            TransferCode.ESCROW_RELEASE,
            worker_net,
            AccountKind.AGENT_AVAILABLE,
            str(escrow.worker_agent_id),
        ),
        ("fee", TransferCode.FEE, fee, AccountKind.PLATFORM_FEES, accounts.PLATFORM_OWNER),
        (
            "refund",
            TransferCode.REFUND,
            refund,
            AccountKind.AGENT_AVAILABLE,
            str(escrow.buyer_agent_id),
        ),
    ]
    legs = [leg for leg in legs if leg[2] > 0]
    found = _accounts(
        session,
        asset,
        [(AccountKind.ESCROW, job_id), *((kind, owner) for *_, kind, owner in legs)],
    )
    specs = [
        ledger.TransferSpec(
            idempotency_key=f"escrow:{job_id}:{name}",
            debit_account_id=found[AccountKind.ESCROW, job_id].id,
            credit_account_id=found[kind, owner].id,
            amount=amount,
            code=code,
            ref_type="escrow",
            ref_id=job_id,
        )
        for name, code, amount, kind, owner in legs
    ]
    ledger.post(session, specs, actor=actor, audit_stream=_stream(job_id))
    _hold(session, escrow.buyer_agent_id, asset, -escrow.amount)
    escrow.status = new_status.value
    escrow.worker_amount = worker_net
    escrow.fee_amount = fee
    escrow.refund_amount = refund
    escrow.resolved_at = utcnow()
    session.flush()
    _record(session, escrow, parties, f"escrow_{new_status.value}", actor)
    _log_settled(escrow)
    return escrow


def _hold(session: Session, buyer_id: int, asset: str, change: int) -> None:
    """`change` to what the buyer's open escrows hold of `asset` (LedgerAccount.escrowed),
    on the available account the fund debited; escrowd_fund_escrow and
    escrowd_settle_escrow do the same on PostgreSQL."""
    held = session.scalars(
        update(LedgerAccount)
        .where(
            LedgerAccount.kind == AccountKind.AGENT_AVAILABLE.value,
            LedgerAccount.owner == str(buyer_id),
            LedgerAccount.asset == asset,
        )
        .values(escrowed=LedgerAccount.escrowed + change)
        .returning(LedgerAccount.id)
    ).all()
    if len(held) != 1:
        raise RuntimeError(f"agent {buyer_id} has no {asset} account holding its escrows")


def _require(escrow: Escrow, allowed: tuple[EscrowStatus, ...], verb: str) -> None:
    if escrow.status not in allowed:
        raise _settled_already(escrow.job_id, escrow.status, verb)


def _settle_job(
    session: Session, job_id: str, how: Settlement, *, worker_amount: int | None, actor: str
) -> Escrow:
    """Settle the escrow of `job_id` the way `how` says, if its status allows it."""
    worker_gross = _worker_gross(how, worker_amount)
    if _in_database(session):
        return _settle_in_database(session, job_id, how, worker_gross=worker_gross, actor=actor)
    escrow, buyer, worker = _lock_escrow(session, job_id)
    _require(escrow, how.allowed, how.verb)
    gross = escrow.amount if worker_gross is None else worker_gross
    if not 0 <= gross <= escrow.amount:
        raise _share_out_of_range(gross, escrow.amount)
    return _settle(
        session, escrow, (buyer, worker), worker_gross=gross, new_status=how.new_status, actor=actor
    )


def release_escrow(session: Session, job_id: str, *, actor: str = "api") -> Escrow:
    """Worker gets amount - fee, the platform gets fee = floor(amount * fee_bps / 10000)
    (see fee_for: the rounding remainder goes to the worker)."""
    return _settle_job(session, job_id, RELEASE, worker_amount=None, actor=actor)


def refund_escrow(session: Session, job_id: str, *, actor: str = "api") -> Escrow:
    """The whole amount back to the buyer; allowed from funded and expired."""
    return _settle_job(session, job_id, REFUND, worker_amount=None, actor=actor)


def resolve_escrow(
    session: Session, job_id: str, worker_amount: int, *, actor: str = "api"
) -> Escrow:
    """Dispute split: `worker_amount` (0..amount) goes to the worker minus the fee on that
    part (floor(worker_amount * fee_bps / 10000)); amount - worker_amount goes back to the
    buyer, with no fee."""
    return _settle_job(session, job_id, RESOLVE, worker_amount=worker_amount, actor=actor)


def expire_due_escrows(session: Session, now: datetime, *, limit: int = 100) -> list[str]:
    """Expire funded escrows whose expiry has passed and refund them: funded -> expired
    -> refunded, both steps recorded. At most `limit` per call; rows another instance is
    changing are skipped (SKIP LOCKED) and picked up next run. Returns the job ids."""
    assert limit >= 1
    due = session.scalars(
        select(Escrow)
        .where(text(DUE_ESCROW_SQL), Escrow.expires_at <= now)
        .order_by(Escrow.expires_at, Escrow.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).all()
    for escrow in due:
        escrow.status = EscrowStatus.EXPIRED.value
        session.flush()
        parties = (
            session.get_one(Agent, escrow.buyer_agent_id),
            session.get_one(Agent, escrow.worker_agent_id),
        )
        _record(session, escrow, parties, "escrow_expired", "scheduler")
        _settle(
            session,
            escrow,
            parties,
            worker_gross=0,
            new_status=EscrowStatus.REFUNDED,
            actor="scheduler",
        )
    return [escrow.job_id for escrow in due]


# --- withdrawals --------------------------------------------------------------------------


def withdraw(
    session: Session,
    *,
    agent: Agent,
    asset: str,
    chain: str,
    family: str,
    to_address: str,
    amount: int,
    idempotency_key: str,
    min_amount_base_units: int,
    platform: PlatformAddresses,
    source_address: str = "",
) -> Payout:
    """Hold `amount` of the agent's available balance for an on-chain payout to
    `to_address` (never one of the `platform` wallets); the payout sender broadcasts it.
    The same `idempotency_key` for the same agent returns the original payout."""
    if not idempotency_key:
        raise ValidationFailed("a withdrawal needs an idempotency key")
    # Hashed: the caller's key may be longer than the payout key column allows.
    key_digest = hashlib.sha256(idempotency_key.encode()).hexdigest()
    return request_payout(
        session,
        chain=chain,
        family=family,
        asset_symbol=asset,
        agent_id=agent.id,
        destination=to_address,
        amount=amount,
        reason=PayoutReason.WITHDRAWAL,
        reference=f"agent:{agent.external_id}",
        idempotency_key=f"withdrawal:{agent.id}:{key_digest}",
        min_amount_base_units=min_amount_base_units,
        platform=platform,
        source_address=source_address,
    )
