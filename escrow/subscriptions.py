"""Recurring charges: a buyer authorizes a fixed amount of an asset every period, paid to a
worker (minus the platform fee) or to the platform itself.

Callers: the HTTP API (create, cancel, resume, reads), `escrow.EscrowService`, and the
`subscriptions` scheduler job (`charge_due`). Each use case runs in the caller's
transaction, except `charge_due`, which gives every subscription a transaction of its own.

Periods: period k starts at `anchor_at` + k * interval_count intervals (day, week, or month;
a month anchored on the 31st falls on the last day of shorter months). A period is charged
at its start. `next_period` is the first period not yet decided; it only grows.

States: active -> paused (a period's charge failed `max_charge_attempts` times) -> active
(resume) ; active | paused -> canceled (terminal).

Each charge is one row per (subscription, period), UNIQUE in the database, and its ledger
transfers carry per-period idempotency keys: two runners, two daemons or a restart in the
middle never charge one period twice. A change locks the subscription row first; the
scheduler skips rows another runner holds (SKIP LOCKED).

Catch-up after downtime: the missed periods are charged in order, at most
`max_catch_up_periods` of the latest (the current one included); older ones are skipped for
good (audit row `subscription_periods_skipped`, event `subscription.periods_skipped`).
Periods that pass while a subscription is paused are skipped the same way on resume.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from prometheus_client import Counter
from sqlalchemy import and_, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import ValidationFailed
from escrowd.config.settings import SubscriptionSettings
from escrowd.escrow import accounts, audit, events, ledger, service
from escrowd.escrow.errors import (
    InsufficientFunds,
    InvalidAmount,
    SubscriptionConflict,
    SubscriptionNotFound,
)
from escrowd.escrow.uow import in_transaction
from escrowd.models import (
    AccountKind,
    Agent,
    ChargeStatus,
    LedgerAccount,
    Subscription,
    SubscriptionCharge,
    SubscriptionInterval,
    SubscriptionStatus,
    TransferCode,
    utcnow,
)
from escrowd.models.subscription import ACTIVE_SUBSCRIPTION_SQL, MAX_INTERVAL_COUNT

log = structlog.get_logger(__name__)

CHARGES = Counter(
    "escrowd_subscription_charges_total",
    "Subscription charge attempts by outcome (succeeded, failed: too little balance).",
    ["asset", "outcome"],
)
CHARGE_ERRORS = Counter(
    "escrowd_subscription_errors_total",
    "Subscriptions whose scheduled charge raised an unexpected error (retried later).",
)

PLATFORM_PAYEE = "platform"
WORKER_PAYEE = "worker"
CANCEL_REQUESTERS = ("buyer", "marketplace")
# A start this far in the past is taken as "now" (clock skew between the caller and us).
START_SKEW_S = 60.0
MAX_ERROR_LENGTH = 500


@dataclass(frozen=True)
class ChargePolicy:
    """How failed charges are retried and how far missed periods are caught up."""

    retry_after_s: float = 3600.0
    max_charge_attempts: int = 3
    max_catch_up_periods: int = 3

    def __post_init__(self) -> None:
        assert self.retry_after_s > 0
        assert self.max_charge_attempts >= 1 and self.max_catch_up_periods >= 1

    @classmethod
    def of(cls, settings: SubscriptionSettings) -> ChargePolicy:
        return cls(
            retry_after_s=settings.retry_after_s,
            max_charge_attempts=settings.max_charge_attempts,
            max_catch_up_periods=settings.max_catch_up_periods,
        )


# --- periods ------------------------------------------------------------------------------


def _add_months(moment: datetime, months: int) -> datetime:
    year, month = divmod(moment.month - 1 + months, 12)
    year += moment.year
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def period_start(subscription: Subscription, period: int) -> datetime:
    """When period `period` (0, 1, ...) begins; computed from the anchor, never by adding
    to the previous period, so month-end anchors do not drift."""
    assert period >= 0
    steps = period * subscription.interval_count
    anchor = subscription.anchor_at
    if subscription.interval == SubscriptionInterval.DAY:
        return anchor + timedelta(days=steps)
    if subscription.interval == SubscriptionInterval.WEEK:
        return anchor + timedelta(weeks=steps)
    assert subscription.interval == SubscriptionInterval.MONTH, subscription.interval
    return _add_months(anchor, steps)


def period_at(subscription: Subscription, moment: datetime) -> int:
    """The period running at `moment` (-1 before the first one starts)."""
    anchor = subscription.anchor_at
    if moment < anchor:
        return -1
    count = subscription.interval_count
    if subscription.interval == SubscriptionInterval.DAY:
        return (moment - anchor) // timedelta(days=count)
    if subscription.interval == SubscriptionInterval.WEEK:
        return (moment - anchor) // timedelta(weeks=count)
    months = (moment.year - anchor.year) * 12 + moment.month - anchor.month
    period = months // count
    # Same month count but an earlier day (or time) of the month: the period before.
    while period > 0 and period_start(subscription, period) > moment:
        period -= 1
    return period


# --- reading ------------------------------------------------------------------------------


def get_subscription(session: Session, external_id: str) -> Subscription:
    found = session.scalars(
        select(Subscription).where(Subscription.external_id == external_id)
    ).one_or_none()
    if found is None:
        raise SubscriptionNotFound(f"no subscription {external_id!r}")
    return found


def list_subscriptions(
    session: Session,
    *,
    buyer: Agent | None = None,
    status: str | None = None,
    after_id: int | None = None,
    limit: int = 100,
) -> Sequence[Subscription]:
    """Subscriptions in creation order after `after_id` (the cursor), at most `limit`."""
    assert 1 <= limit <= service.MAX_PAGE_SIZE
    query = select(Subscription).order_by(Subscription.id).limit(limit)
    if buyer is not None:
        query = query.where(Subscription.buyer_agent_id == buyer.id)
    if status is not None:
        query = query.where(Subscription.status == status)
    if after_id is not None:
        query = query.where(Subscription.id > after_id)
    return session.scalars(query).all()


def list_charges(
    session: Session, subscription: Subscription, *, after_period: int | None = None, limit: int
) -> Sequence[SubscriptionCharge]:
    """A subscription's charges by period, after `after_period` (the cursor)."""
    assert 1 <= limit <= service.MAX_PAGE_SIZE
    query = (
        select(SubscriptionCharge)
        .where(SubscriptionCharge.subscription_id == subscription.id)
        .order_by(SubscriptionCharge.period_index)
        .limit(limit)
    )
    if after_period is not None:
        query = query.where(SubscriptionCharge.period_index > after_period)
    return session.scalars(query).all()


# --- one subscription's changes -----------------------------------------------------------


def _moment(value: datetime | None) -> str | None:
    return None if value is None else audit.timestamp_text(value)


def _units(value: int | None) -> str | None:
    return None if value is None else str(value)


def _insert_for(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


@dataclass(frozen=True)
class _Change:
    """One change of one subscription, in the caller's transaction, with the row locked:
    who pays whom, when it happens and on whose behalf."""

    session: Session
    subscription: Subscription
    buyer: Agent
    worker: Agent | None
    now: datetime
    actor: str

    @property
    def stream(self) -> str:
        return f"subscription:{self.subscription.external_id}"

    def event_data(self, charge: SubscriptionCharge | None) -> dict[str, Any]:
        subscription = self.subscription
        active = subscription.status == SubscriptionStatus.ACTIVE
        data: dict[str, Any] = {
            "subscription_id": subscription.external_id,
            "status": subscription.status,
            "buyer": self.buyer.external_id,
            "worker": None if self.worker is None else self.worker.external_id,
            "payee": PLATFORM_PAYEE if self.worker is None else WORKER_PAYEE,
            "asset": subscription.asset,
            "amount_base_units": str(subscription.amount),
            "fee_bps": subscription.fee_bps,
            "interval": subscription.interval,
            "interval_count": subscription.interval_count,
            "next_period_index": subscription.next_period,
            "next_charge_at": _moment(subscription.next_charge_at) if active else None,
        }
        if charge is not None:
            data["charge"] = {
                "period_index": charge.period_index,
                "period_start": _moment(charge.period_start),
                "status": charge.status,
                "attempts": charge.attempts,
                "payee_amount_base_units": _units(charge.payee_amount),
                "fee_amount_base_units": _units(charge.fee_amount),
                "error": charge.last_error,
            }
        return data

    def record(
        self,
        what: str,
        *,
        charge: SubscriptionCharge | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """The audit row and webhook event of a change: action `subscription_<what>`,
        event `subscription.<what>`."""
        subscription = self.subscription
        extra = details or {}
        charged = (
            {}
            if charge is None
            else {
                "period_index": charge.period_index,
                "charge_status": charge.status,
                "attempts": charge.attempts,
                "payee_amount": charge.payee_amount,
                "fee_amount": charge.fee_amount,
            }
        )
        audit.append(
            self.session,
            stream=self.stream,
            actor=self.actor,
            action=f"subscription_{what}",
            asset=subscription.asset,
            amount=subscription.amount,
            details={
                "status": subscription.status,
                "next_period": subscription.next_period,
                **charged,
                **extra,
            },
        )
        events.emit(self.session, f"subscription.{what}", {**self.event_data(charge), **extra})

    def _charge_row(self, period: int) -> SubscriptionCharge:
        """The period's charge row with this attempt counted, locked until commit: created
        by the first attempt, its attempts counted up by each later one while it has not
        succeeded. Of two runners reaching it at once, the second's statement waits for
        the first's commit and then sees what the first did. A row that succeeded is
        returned as it is."""
        session, subscription = self.session, self.subscription
        key = (
            SubscriptionCharge.subscription_id == subscription.id,
            SubscriptionCharge.period_index == period,
        )
        counted: SubscriptionCharge | None = session.scalars(
            _insert_for(session)(SubscriptionCharge)
            .values(
                subscription_id=subscription.id,
                period_index=period,
                period_start=period_start(subscription, period),
                amount=subscription.amount,
                status=ChargeStatus.FAILED.value,
                attempts=1,
                created_at=self.now,
                updated_at=self.now,
            )
            .on_conflict_do_update(
                index_elements=["subscription_id", "period_index"],
                set_={"attempts": SubscriptionCharge.attempts + 1, "updated_at": self.now},
                where=SubscriptionCharge.status == ChargeStatus.FAILED.value,
            )
            .returning(SubscriptionCharge),
            execution_options={"populate_existing": True},
        ).one_or_none()
        if counted is not None:
            return counted
        return session.scalars(
            select(SubscriptionCharge).where(*key).execution_options(populate_existing=True)
        ).one()

    def _accounts(self, fee: int) -> tuple[int, int, int | None]:
        """Ledger account ids of the buyer, the payee and (when there is a fee) the
        platform's fees, read in one query; missing ones are opened."""
        asset = self.subscription.asset
        buyer = (AccountKind.AGENT_AVAILABLE, str(self.buyer.id))
        platform = (AccountKind.PLATFORM_FEES, accounts.PLATFORM_OWNER)
        payee = (
            platform if self.worker is None else (AccountKind.AGENT_AVAILABLE, str(self.worker.id))
        )
        wanted = [buyer, payee, *([platform] if fee else [])]
        found = {
            (row.kind, row.owner): row.id
            for row in self.session.execute(
                select(LedgerAccount.kind, LedgerAccount.owner, LedgerAccount.id).where(
                    LedgerAccount.asset == asset,
                    or_(
                        *(
                            and_(LedgerAccount.kind == k, LedgerAccount.owner == o)
                            for k, o in wanted
                        )
                    ),
                )
            )
        }
        for kind, owner in wanted:
            if (kind, owner) not in found:
                account = ledger.get_or_create_account(self.session, kind, owner, asset)
                found[kind, owner] = account.id
        return found[buyer], found[payee], found[platform] if fee else None

    def _post(self, period: int) -> tuple[int, int]:
        """The period's ledger transfers out of the buyer's balance; returns (payee's
        amount, fee). Raises InsufficientFunds, posting nothing, when the balance is short."""
        subscription = self.subscription
        amount = subscription.amount
        fee = 0 if self.worker is None else service.fee_for(amount, subscription.fee_bps)
        buyer, payee, platform = self._accounts(fee)
        legs = [("payee", payee, amount - fee, TransferCode.SUBSCRIPTION_CHARGE)]
        if platform is not None:
            legs.append(("fee", platform, fee, TransferCode.FEE))
        key = f"subscription:{subscription.id}:{period}"
        ledger.post(
            self.session,
            [
                ledger.TransferSpec(
                    idempotency_key=f"{key}:{name}",
                    debit_account_id=buyer,
                    credit_account_id=credit_id,
                    amount=leg_amount,
                    code=code,
                    ref_type="subscription",
                    ref_id=subscription.external_id,
                )
                for name, credit_id, leg_amount, code in legs
                if leg_amount > 0
            ],
            actor=self.actor,
            audit_stream=self.stream,
        )
        return amount - fee, fee

    def attempt(self, period: int) -> SubscriptionCharge:
        """Try to charge `period` once. Returns its row, succeeded or failed; a row that
        succeeded before is returned as it is."""
        subscription = self.subscription
        charge = self._charge_row(period)
        if charge.status == ChargeStatus.SUCCEEDED:
            return charge
        try:
            payee_amount, fee = self._post(period)
        except InsufficientFunds:
            charge.last_error = (
                f"buyer {self.buyer.external_id} had less than {subscription.amount} base "
                f"units of {subscription.asset} available"
            )
            self.session.flush()
            CHARGES.labels(subscription.asset, "failed").inc()
            log.warning(
                "subscription_charge_failed",
                subscription_id=subscription.external_id,
                period_index=period,
                attempts=charge.attempts,
            )
            return charge
        charge.status = ChargeStatus.SUCCEEDED.value
        charge.payee_amount, charge.fee_amount = payee_amount, fee
        charge.charged_at = self.now
        charge.last_error = None
        self.session.flush()
        CHARGES.labels(subscription.asset, "succeeded").inc()
        log.info(
            "subscription_charged",
            subscription_id=subscription.external_id,
            period_index=period,
            asset=subscription.asset,
            amount_base_units=subscription.amount,
        )
        return charge

    def skip_to(self, period: int, reason: str) -> None:
        """Give up periods next_period .. period - 1 for good: nothing is charged for them."""
        subscription = self.subscription
        first = subscription.next_period
        assert period > first
        subscription.next_period = period
        self.session.flush()
        self.record(
            "periods_skipped",
            details={
                "skipped_from_period": first,
                "skipped_to_period": period - 1,
                "reason": reason,
            },
        )
        log.warning(
            "subscription_periods_skipped",
            subscription_id=subscription.external_id,
            first_period=first,
            last_period=period - 1,
            reason=reason,
        )

    def charge_through(
        self, policy: ChargePolicy, *, refuse_failure: bool
    ) -> list[SubscriptionCharge]:
        """Charge every period due by now, oldest first, within the catch-up bound; stop at
        the first failure. With `refuse_failure` (a charge the caller waits for: the first
        at creation, the one at resume) a failure raises InsufficientFunds instead of being
        recorded, so the caller's transaction changes nothing."""
        subscription = self.subscription
        assert subscription.status == SubscriptionStatus.ACTIVE
        current = period_at(subscription, self.now)
        oldest = current - policy.max_catch_up_periods + 1
        if subscription.next_period < oldest:
            self.skip_to(oldest, "catch_up_limit")
        charges: list[SubscriptionCharge] = []
        while subscription.next_period <= current:
            period = subscription.next_period
            charge = self.attempt(period)
            charges.append(charge)
            if charge.status != ChargeStatus.SUCCEEDED:
                if refuse_failure:
                    raise InsufficientFunds(
                        f"{charge.last_error}; the charge for period {period} needs that "
                        "much: deposit more and try again"
                    )
                self._failed(charge, policy)
                return charges
            # Both set before the record's flush writes them, in one UPDATE.
            subscription.next_period = period + 1
            subscription.next_charge_at = period_start(subscription, period + 1)
            self.record("charged", charge=charge)
        if subscription.next_charge_at != period_start(subscription, subscription.next_period):
            subscription.next_charge_at = period_start(subscription, subscription.next_period)
        if subscription.last_error is not None:
            subscription.last_error = None
        self.session.flush()
        return charges

    def _failed(self, charge: SubscriptionCharge, policy: ChargePolicy) -> None:
        """A recorded failure: retried after `retry_after_s`, or the subscription pauses."""
        subscription = self.subscription
        if charge.attempts >= policy.max_charge_attempts:
            subscription.status = SubscriptionStatus.PAUSED.value
            subscription.paused_at = self.now
        else:
            subscription.next_charge_at = self.now + timedelta(seconds=policy.retry_after_s)
        self.session.flush()
        self.record("charge_failed", charge=charge)
        if subscription.status == SubscriptionStatus.PAUSED:
            self.record("paused", charge=charge)
            log.warning(
                "subscription_paused",
                subscription_id=subscription.external_id,
                period_index=charge.period_index,
                attempts=charge.attempts,
            )


# --- use cases ----------------------------------------------------------------------------


def _change(session: Session, subscription: Subscription, now: datetime, actor: str) -> _Change:
    buyer_id, worker_id = subscription.buyer_agent_id, subscription.worker_agent_id
    parties = {
        agent.id: agent
        for agent in session.scalars(
            select(Agent).where(Agent.id.in_([buyer_id, worker_id or buyer_id]))
        )
    }
    return _Change(
        session=session,
        subscription=subscription,
        buyer=parties[buyer_id],
        worker=None if worker_id is None else parties[worker_id],
        now=now,
        actor=actor,
    )


def _lock(session: Session, external_id: str) -> Subscription:
    found = session.scalars(
        select(Subscription)
        .where(Subscription.external_id == external_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if found is None:
        raise SubscriptionNotFound(f"no subscription {external_id!r}")
    return found


@dataclass(frozen=True)
class NewSubscription:
    """A create request, checked before anything is written."""

    external_id: str
    buyer: Agent
    worker: Agent | None
    asset: str
    amount: int
    interval: str
    interval_count: int
    fee_bps: int
    starts_at: datetime | None = None

    def check(self, now: datetime) -> None:
        if not self.external_id or len(self.external_id) > service.MAX_EXTERNAL_ID_LENGTH:
            raise ValidationFailed(
                f"subscription id must be 1 to {service.MAX_EXTERNAL_ID_LENGTH} characters"
            )
        amount = self.amount
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise InvalidAmount(f"subscription amount must be a positive integer, got {amount!r}")
        if amount > ledger.MAX_AMOUNT:
            raise InvalidAmount(f"subscription amount {amount} exceeds the largest storable")
        if self.interval not in set(SubscriptionInterval):
            raise ValidationFailed(
                f"interval must be one of {', '.join(SubscriptionInterval)}, got {self.interval!r}"
            )
        count = self.interval_count
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValidationFailed(f"interval_count must be an integer, got {count!r}")
        if not 1 <= count <= MAX_INTERVAL_COUNT:
            raise ValidationFailed(
                f"interval_count must be between 1 and {MAX_INTERVAL_COUNT}, got {count}"
            )
        if not 0 <= self.fee_bps <= service.BPS_DENOMINATOR:
            raise ValidationFailed(f"fee_bps must be between 0 and 10000, got {self.fee_bps}")
        if self.worker is None and self.fee_bps != 0:
            raise ValidationFailed(
                "fee_bps applies to a worker payee; a subscription paying the platform has no fee"
            )
        if self.worker is not None and self.worker.id == self.buyer.id:
            raise ValidationFailed("buyer and worker must be different agents")
        starts_at = self.starts_at
        if starts_at is not None:
            if starts_at.tzinfo is None:
                raise ValidationFailed("starts_at must carry a timezone (UTC)")
            if starts_at < now - timedelta(seconds=START_SKEW_S):
                raise ValidationFailed(
                    "starts_at is in the past; give a future time, or none to start now"
                )


def create_subscription(
    session: Session,
    request: NewSubscription,
    *,
    now: datetime,
    policy: ChargePolicy,
    actor: str = "api",
) -> Subscription:
    """A new active subscription. One that starts now (no `starts_at`, or one within the
    clock-skew allowance) is charged for its first period in the same transaction: when
    the buyer cannot cover it the whole request is refused (InsufficientFunds) and nothing
    is created. One id per subscription: a second create of it is SubscriptionConflict."""
    request.check(now)
    service.asset_decimals(session, request.asset)
    anchor = now if request.starts_at is None or request.starts_at <= now else request.starts_at
    created: Subscription | None = session.scalars(
        _insert_for(session)(Subscription)
        .values(
            external_id=request.external_id,
            buyer_agent_id=request.buyer.id,
            worker_agent_id=None if request.worker is None else request.worker.id,
            asset=request.asset,
            amount=request.amount,
            fee_bps=request.fee_bps,
            interval=request.interval,
            interval_count=request.interval_count,
            anchor_at=anchor,
            status=SubscriptionStatus.ACTIVE.value,
            next_period=0,
            next_charge_at=anchor,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["external_id"])
        .returning(Subscription)
    ).one_or_none()
    if created is None:
        status = session.scalars(
            select(Subscription.status).where(Subscription.external_id == request.external_id)
        ).one()
        raise SubscriptionConflict(
            f"subscription {request.external_id} already exists ({status}); use a new id"
        )
    change = _Change(session, created, request.buyer, request.worker, now, actor)
    change.record("created", details={"anchor_at": _moment(anchor)})
    log.info(
        "subscription_created",
        subscription_id=created.external_id,
        asset=created.asset,
        amount_base_units=created.amount,
        interval=created.interval,
        interval_count=created.interval_count,
    )
    if anchor <= now:
        change.charge_through(policy, refuse_failure=True)
    return created


def cancel_subscription(
    session: Session,
    external_id: str,
    *,
    requested_by: str = "marketplace",
    now: datetime,
    actor: str = "api",
) -> Subscription:
    """Stop charging for good (from active or paused). Charges made stay made."""
    if requested_by not in CANCEL_REQUESTERS:
        raise ValidationFailed(
            f"requested_by must be one of {', '.join(CANCEL_REQUESTERS)}, got {requested_by!r}"
        )
    subscription = _lock(session, external_id)
    if subscription.status == SubscriptionStatus.CANCELED:
        raise SubscriptionConflict(f"subscription {external_id} is already canceled")
    subscription.status = SubscriptionStatus.CANCELED.value
    subscription.canceled_at = now
    subscription.canceled_by = requested_by
    session.flush()
    change = _change(session, subscription, now, actor)
    change.record("canceled", details={"requested_by": requested_by})
    log.info("subscription_canceled", subscription_id=external_id, requested_by=requested_by)
    return subscription


def resume_subscription(
    session: Session,
    external_id: str,
    *,
    now: datetime,
    policy: ChargePolicy,
    actor: str = "api",
) -> Subscription:
    """Make a paused subscription active again and charge the current period now. Periods
    that passed while it was paused (the one that failed included, if it is over) are
    skipped. When the buyer still cannot cover the charge the request is refused
    (InsufficientFunds) and the subscription stays paused."""
    subscription = _lock(session, external_id)
    if subscription.status != SubscriptionStatus.PAUSED:
        raise SubscriptionConflict(
            f"subscription {external_id} is {subscription.status}; only a paused one resumes"
        )
    change = _change(session, subscription, now, actor)
    current = period_at(subscription, now)
    if subscription.next_period < current:
        change.skip_to(current, "paused")
    subscription.status = SubscriptionStatus.ACTIVE.value
    subscription.paused_at = None
    session.flush()
    change.record("resumed")
    change.charge_through(policy, refuse_failure=True)
    log.info("subscription_resumed", subscription_id=external_id)
    return subscription


def charge_subscription(
    session: Session, subscription_id: int, now: datetime, policy: ChargePolicy
) -> list[SubscriptionCharge]:
    """The scheduler's work on one subscription (by row id) in the caller's transaction:
    nothing if it is no longer due or another runner holds it."""
    subscription = session.scalars(
        select(Subscription)
        .where(
            Subscription.id == subscription_id,
            text(ACTIVE_SUBSCRIPTION_SQL),
            Subscription.next_charge_at <= now,
        )
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if subscription is None:
        return []
    change = _change(session, subscription, now, "scheduler")
    return change.charge_through(policy, refuse_failure=False)


@dataclass
class ChargeRun:
    """What one scheduler pass did."""

    subscriptions: int = 0
    charged: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def charge_due(
    sessions: sessionmaker[Session], now: datetime, policy: ChargePolicy, *, limit: int = 100
) -> ChargeRun:
    """Charge the subscriptions due by `now`, at most `limit` of them, each in a
    transaction of its own. An unexpected error on one is recorded on it (its next look
    pushed back by `retry_after_s`), counted and logged; the others go on."""
    assert limit >= 1
    with sessions() as session, session.begin():
        due = session.scalars(
            select(Subscription.id)
            .where(text(ACTIVE_SUBSCRIPTION_SQL), Subscription.next_charge_at <= now)
            .order_by(Subscription.next_charge_at, Subscription.id)
            .limit(limit)
        ).all()
    run = ChargeRun(subscriptions=len(due))
    for subscription_id in due:
        try:
            charges = in_transaction(sessions, _charging(subscription_id, now, policy))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]
            run.errors.append(error)
            CHARGE_ERRORS.inc()
            log.error("subscription_charge_error", subscription=subscription_id, error=error)
            _note_error(sessions, subscription_id, now, policy, error)
            continue
        run.charged += charges.count(ChargeStatus.SUCCEEDED)
        run.failed += charges.count(ChargeStatus.FAILED)
    return run


def charge_all_due(
    sessions: sessionmaker[Session],
    policy: ChargePolicy,
    *,
    batch_size: int,
    budget_s: float,
    clock: Callable[[], datetime] = utcnow,
) -> ChargeRun:
    """The scheduler job's tick: `charge_due` batch after batch until nothing is due, a
    batch did nothing (what is left is held by another runner) or `budget_s` has passed,
    so a day on which thousands of subscriptions renew is caught up within ticks."""
    started = time.monotonic()
    total = ChargeRun()
    while True:
        run = charge_due(sessions, clock(), policy, limit=batch_size)
        total.subscriptions += run.subscriptions
        total.charged += run.charged
        total.failed += run.failed
        total.errors.extend(run.errors)
        progress = run.charged + run.failed + len(run.errors)
        if run.subscriptions < batch_size or not progress:
            return total
        if time.monotonic() - started >= budget_s:
            return total


def _charging(
    subscription_id: int, now: datetime, policy: ChargePolicy
) -> Callable[[Session], list[str]]:
    def work(session: Session) -> list[str]:
        return [
            charge.status for charge in charge_subscription(session, subscription_id, now, policy)
        ]

    return work


def _note_error(
    sessions: sessionmaker[Session],
    subscription_id: int,
    now: datetime,
    policy: ChargePolicy,
    error: str,
) -> None:
    def note(session: Session) -> None:
        subscription = session.get(Subscription, subscription_id, with_for_update=True)
        if subscription is not None:
            subscription.last_error = error
            subscription.next_charge_at = now + timedelta(seconds=policy.retry_after_s)

    try:
        in_transaction(sessions, note)
    except Exception as exc:
        # The database itself is failing; the next pass sees the subscription again.
        log.error("subscription_error_not_recorded", subscription=subscription_id, error=str(exc))
