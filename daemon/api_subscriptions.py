"""HTTP routes of recurring charges under /v1/subscriptions (escrow.subscriptions).

Mounted by daemon.api.create_app on its /v1 router. Like the other routes they only
translate: decimal strings in the asset's units in and out, one service call per request
in one transaction, mutations under an Idempotency-Key.
"""

# No `from __future__ import annotations`: FastAPI must see the route signatures evaluated.
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from escrowd.daemon.api_deps import (
    IdempotencyKeyHeader,
    Outcome,
    ReadKey,
    WriteKey,
    mutate,
    state_of,
)
from escrowd.daemon.api_schemas import (
    EXTERNAL_ID_PATTERN,
    AssetSymbol,
    BaseUnits,
    DecimalString,
    ExternalId,
    Timestamp,
)
from escrowd.escrow import service, subscriptions
from escrowd.escrow.money import format_amount, parse_amount
from escrowd.models import Agent, Subscription, SubscriptionCharge, SubscriptionStatus, utcnow
from escrowd.models.subscription import MAX_INTERVAL_COUNT

SubscriptionIdPath = Annotated[str, Path(min_length=1, max_length=128, pattern=EXTERNAL_ID_PATTERN)]
DEFAULT_PAGE_SIZE = 50


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SubscriptionCreate(_Body):
    id: ExternalId = Field(description="The marketplace's own id of the subscription.")
    buyer: ExternalId = Field(description="The agent charged every period.")
    worker: ExternalId | None = Field(
        default=None,
        description="The agent paid every period (minus the fee); omit it to pay the platform.",
    )
    asset: AssetSymbol
    amount: DecimalString = Field(description="Charged every period, in the asset's units.")
    interval: Literal["day", "week", "month"]
    interval_count: Annotated[int, Field(ge=1, le=MAX_INTERVAL_COUNT)] = Field(
        default=1, description="Periods last this many intervals (2 with week: fortnightly)."
    )
    fee_bps: Annotated[int, Field(ge=0, le=10_000)] | None = Field(
        default=None,
        description="Platform fee on each charge to a worker, in basis points; defaults to "
        "the configured fee. Not allowed when the platform is the payee.",
    )
    starts_at: Timestamp | None = Field(
        default=None,
        description="Start of the first period (with a timezone). Omitted: now, and the "
        "first period is charged in this request (422 when the buyer cannot cover it).",
    )


class SubscriptionCancel(_Body):
    requested_by: Literal["buyer", "marketplace"] = Field(
        default="marketplace", description="Who asked for the cancellation (recorded)."
    )


class SubscriptionOut(BaseModel):
    id: str
    status: Literal["active", "paused", "canceled"]
    buyer: str
    worker: str | None
    payee: Literal["worker", "platform"]
    asset: str
    amount: str
    amount_base_units: BaseUnits
    fee_bps: int
    interval: Literal["day", "week", "month"]
    interval_count: int
    starts_at: datetime = Field(description="Start of period 0; period k starts k intervals on.")
    next_period_index: int = Field(description="The first period not charged or skipped yet.")
    next_charge_at: datetime | None = Field(
        description="When the next charge (or the retry of a failed one) is due; null "
        "unless active."
    )
    paused_at: datetime | None
    canceled_at: datetime | None
    canceled_by: Literal["buyer", "marketplace"] | None
    created_at: datetime


class SubscriptionPage(BaseModel):
    data: list[SubscriptionOut]
    next_cursor: int | None = Field(description="Pass as ?cursor= for the next page.")


class ChargeOut(BaseModel):
    period_index: int
    period_start: datetime
    status: Literal["succeeded", "failed"]
    attempts: int
    amount: str
    amount_base_units: BaseUnits
    payee_amount: str | None
    payee_amount_base_units: BaseUnits | None
    fee_amount: str | None
    fee_amount_base_units: BaseUnits | None
    error: str | None = Field(description="Why the last attempt failed.")
    charged_at: datetime | None


class ChargePage(BaseModel):
    data: list[ChargeOut]
    next_cursor: int | None = Field(description="Pass as ?cursor= for the next page.")


def _subscription_out(session: Session, subscription: Subscription) -> SubscriptionOut:
    decimals = service.asset_decimals(session, subscription.asset)
    buyer = session.get_one(Agent, subscription.buyer_agent_id)
    worker_id = subscription.worker_agent_id
    worker = None if worker_id is None else session.get_one(Agent, worker_id).external_id
    active = subscription.status == SubscriptionStatus.ACTIVE
    return SubscriptionOut.model_validate(
        {
            "id": subscription.external_id,
            "status": subscription.status,
            "buyer": buyer.external_id,
            "worker": worker,
            "payee": subscriptions.PLATFORM_PAYEE if worker is None else subscriptions.WORKER_PAYEE,
            "asset": subscription.asset,
            "amount": format_amount(subscription.amount, decimals),
            "amount_base_units": str(subscription.amount),
            "fee_bps": subscription.fee_bps,
            "interval": subscription.interval,
            "interval_count": subscription.interval_count,
            "starts_at": subscription.anchor_at,
            "next_period_index": subscription.next_period,
            "next_charge_at": subscription.next_charge_at if active else None,
            "paused_at": subscription.paused_at,
            "canceled_at": subscription.canceled_at,
            "canceled_by": subscription.canceled_by,
            "created_at": subscription.created_at,
        }
    )


def _units(value: int | None, decimals: int) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    return format_amount(value, decimals), str(value)


def _charge_out(charge: SubscriptionCharge, decimals: int) -> ChargeOut:
    payee_amount, payee_units = _units(charge.payee_amount, decimals)
    fee_amount, fee_units = _units(charge.fee_amount, decimals)
    return ChargeOut.model_validate(
        {
            "period_index": charge.period_index,
            "period_start": charge.period_start,
            "status": charge.status,
            "attempts": charge.attempts,
            "amount": format_amount(charge.amount, decimals),
            "amount_base_units": str(charge.amount),
            "payee_amount": payee_amount,
            "payee_amount_base_units": payee_units,
            "fee_amount": fee_amount,
            "fee_amount_base_units": fee_units,
            "error": charge.last_error,
            "charged_at": charge.charged_at,
        }
    )


def install(router: APIRouter, page_max: int) -> None:
    """Add the subscription routes to the API's /v1 router."""

    @router.post(
        "/subscriptions", status_code=201, response_model=SubscriptionOut, tags=["subscriptions"]
    )
    def create_subscription(
        request: Request, body: SubscriptionCreate, principal: WriteKey, key: IdempotencyKeyHeader
    ) -> Response:
        """Authorize a recurring charge. Without `starts_at` the first period is charged
        now; when the buyer cannot cover it the answer is 422 and nothing is created."""
        state = state_of(request)
        settings = state.settings
        policy = subscriptions.ChargePolicy.of(settings.subscriptions)
        default_bps = settings.escrow.default_fee_bps if body.worker is not None else 0

        def work(s: Session) -> Outcome:
            decimals = service.asset_decimals(s, body.asset)
            subscription = subscriptions.create_subscription(
                s,
                subscriptions.NewSubscription(
                    external_id=body.id,
                    buyer=state.agent(body.buyer),
                    worker=None if body.worker is None else state.agent(body.worker),
                    asset=body.asset,
                    amount=parse_amount(body.amount, decimals),
                    interval=body.interval,
                    interval_count=body.interval_count,
                    fee_bps=default_bps if body.fee_bps is None else body.fee_bps,
                    starts_at=body.starts_at,
                ),
                now=utcnow(),
                policy=policy,
                actor=f"apikey:{principal.prefix}",
            )
            return 201, _subscription_out(s, subscription).model_dump(mode="json")

        return mutate(request, principal, key, body, work)

    @router.get("/subscriptions", response_model=SubscriptionPage, tags=["subscriptions"])
    def list_subscriptions(
        *,
        request: Request,
        _: ReadKey,
        buyer: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
        status: Literal["active", "paused", "canceled"] | None = None,
        cursor: Annotated[int | None, Query(ge=1, le=2**62)] = None,
        limit: Annotated[int, Query(ge=1, le=page_max)] = DEFAULT_PAGE_SIZE,
    ) -> SubscriptionPage:
        """Subscriptions oldest first, optionally of one buyer or in one status."""

        def work(s: Session) -> SubscriptionPage:
            owner = service.get_agent(s, buyer) if buyer is not None else None
            rows = subscriptions.list_subscriptions(
                s, buyer=owner, status=status, after_id=cursor, limit=limit
            )
            return SubscriptionPage(
                data=[_subscription_out(s, row) for row in rows],
                next_cursor=rows[-1].id if len(rows) == limit else None,
            )

        result: SubscriptionPage = state_of(request).read(work)
        return result

    @router.get(
        "/subscriptions/{subscription_id}",
        response_model=SubscriptionOut,
        tags=["subscriptions"],
    )
    def get_subscription(
        request: Request, subscription_id: SubscriptionIdPath, _: ReadKey
    ) -> SubscriptionOut:
        result: SubscriptionOut = state_of(request).read(
            lambda s: _subscription_out(s, subscriptions.get_subscription(s, subscription_id))
        )
        return result

    @router.get(
        "/subscriptions/{subscription_id}/charges",
        response_model=ChargePage,
        tags=["subscriptions"],
    )
    def list_charges(
        *,
        request: Request,
        subscription_id: SubscriptionIdPath,
        _: ReadKey,
        cursor: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
        limit: Annotated[int, Query(ge=1, le=page_max)] = DEFAULT_PAGE_SIZE,
    ) -> ChargePage:
        """The charges of a subscription by period; a period that failed shows its last
        error and the number of attempts."""

        def work(s: Session) -> ChargePage:
            subscription = subscriptions.get_subscription(s, subscription_id)
            decimals = service.asset_decimals(s, subscription.asset)
            rows = subscriptions.list_charges(s, subscription, after_period=cursor, limit=limit)
            return ChargePage(
                data=[_charge_out(row, decimals) for row in rows],
                next_cursor=rows[-1].period_index if len(rows) == limit else None,
            )

        result: ChargePage = state_of(request).read(work)
        return result

    @router.post(
        "/subscriptions/{subscription_id}/cancel",
        response_model=SubscriptionOut,
        tags=["subscriptions"],
    )
    def cancel_subscription(
        request: Request,
        subscription_id: SubscriptionIdPath,
        principal: WriteKey,
        key: IdempotencyKeyHeader,
        body: SubscriptionCancel | None = None,
    ) -> Response:
        """Stop charging for good (active or paused); charges made stay made."""
        requested_by = "marketplace" if body is None else body.requested_by

        def work(s: Session) -> Outcome:
            subscription = subscriptions.cancel_subscription(
                s,
                subscription_id,
                requested_by=requested_by,
                now=utcnow(),
                actor=f"apikey:{principal.prefix}",
            )
            return 200, _subscription_out(s, subscription).model_dump(mode="json")

        return mutate(request, principal, key, body, work)

    @router.post(
        "/subscriptions/{subscription_id}/resume",
        response_model=SubscriptionOut,
        tags=["subscriptions"],
    )
    def resume_subscription(
        request: Request,
        subscription_id: SubscriptionIdPath,
        principal: WriteKey,
        key: IdempotencyKeyHeader,
    ) -> Response:
        """Reactivate a paused subscription and charge the current period now (422, and it
        stays paused, when the buyer still cannot cover it). Periods that passed while it
        was paused are not charged."""
        policy = subscriptions.ChargePolicy.of(state_of(request).settings.subscriptions)

        def work(s: Session) -> Outcome:
            subscription = subscriptions.resume_subscription(
                s,
                subscription_id,
                now=utcnow(),
                policy=policy,
                actor=f"apikey:{principal.prefix}",
            )
            return 200, _subscription_out(s, subscription).model_dump(mode="json")

        return mutate(request, principal, key, None, work)


__all__ = ["install"]
