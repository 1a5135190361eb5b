"""Values the HTTP API returns beyond those `EscrowService` shares (escrow.values), and the
readers that turn the API's JSON into values.

Amounts are integers in base units (read from the ``*_base_units`` strings, never from
the decimal strings), times timezone-aware UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar, get_args

from escrowd.escrow.values import Agent, Balance, Escrow, EscrowState, Withdrawal

T = TypeVar("T")
Json = Mapping[str, Any]
_STATES: dict[str, EscrowState] = {state: state for state in get_args(EscrowState)}


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list; pass `next_cursor` as `cursor` for the next (None: last page)."""

    items: tuple[T, ...]
    next_cursor: int | None


@dataclass(frozen=True, slots=True)
class DepositAddress:
    agent: str
    chain: str
    address: str
    derivation_index: int
    token_account: str | None


@dataclass(frozen=True, slots=True)
class Deposit:
    id: int
    agent: str
    chain: str
    asset: str
    amount_base_units: int
    tx_hash: str
    log_index: int
    block_number: int
    status: str
    credited: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    stream: str
    seq: int
    actor: str
    action: str
    asset: str | None
    amount_base_units: int | None
    details: Mapping[str, Any]
    created_at: datetime
    row_hash: str


@dataclass(frozen=True, slots=True)
class AuditReport:
    ok: bool
    rows_checked: int
    streams_checked: int
    first_problem: str | None


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """`secret` is set only in the answer that created the endpoint (None on a replay)."""

    id: int
    url: str
    event_types: tuple[str, ...]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    secret: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    id: int
    endpoint_id: int
    event_id: int
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime


# --- readers of the API's JSON -----------------------------------------------------------


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _maybe_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _maybe_int(text: str | None) -> int | None:
    return None if text is None else int(text)


def agent(body: Json) -> Agent:
    return Agent(id=body["id"], name=body["name"], created_at=_time(body["created_at"]))


def escrow(body: Json) -> Escrow:
    return Escrow(
        job_id=body["job_id"],
        status=_STATES[body["status"]],
        buyer=body["buyer"],
        worker=body["worker"],
        asset=body["asset"],
        amount_base_units=int(body["amount_base_units"]),
        fee_bps=body["fee_bps"],
        worker_amount_base_units=_maybe_int(body["worker_amount_base_units"]),
        fee_amount_base_units=_maybe_int(body["fee_amount_base_units"]),
        refund_amount_base_units=_maybe_int(body["refund_amount_base_units"]),
        expires_at=_maybe_time(body["expires_at"]),
        resolved_at=_maybe_time(body["resolved_at"]),
        created_at=_time(body["created_at"]),
    )


def balances(body: Json) -> list[Balance]:
    return [
        Balance(
            asset=row["asset"],
            decimals=row["decimals"],
            available_base_units=int(row["available_base_units"]),
            escrowed_as_buyer_base_units=int(row["escrowed_as_buyer_base_units"]),
        )
        for row in body["balances"]
    ]


def withdrawal(body: Json) -> Withdrawal:
    return Withdrawal(
        id=body["id"],
        agent=body["agent_id"],
        chain=body["chain"],
        asset=body["asset"],
        destination=body["destination"],
        amount_base_units=int(body["amount_base_units"]),
        status=body["status"],
        created_at=_time(body["created_at"]),
    )


def deposit_address(body: Json) -> DepositAddress:
    return DepositAddress(
        agent=body["agent_id"],
        chain=body["chain"],
        address=body["address"],
        derivation_index=body["derivation_index"],
        token_account=body["token_account"],
    )


def deposit(body: Json) -> Deposit:
    return Deposit(
        id=body["id"],
        agent=body["agent_id"],
        chain=body["chain"],
        asset=body["asset"],
        amount_base_units=int(body["amount_base_units"]),
        tx_hash=body["tx_hash"],
        log_index=body["log_index"],
        block_number=body["block_number"],
        status=body["status"],
        credited=body["credited"],
        created_at=_time(body["created_at"]),
    )


def audit_row(body: Json) -> AuditRow:
    return AuditRow(
        id=body["id"],
        stream=body["stream"],
        seq=body["seq"],
        actor=body["actor"],
        action=body["action"],
        asset=body["asset"],
        amount_base_units=_maybe_int(body["amount_base_units"]),
        details=body["details"],
        created_at=_time(body["created_at"]),
        row_hash=body["row_hash"],
    )


def audit_report(body: Json) -> AuditReport:
    return AuditReport(
        ok=body["ok"],
        rows_checked=body["rows_checked"],
        streams_checked=body["streams_checked"],
        first_problem=body["first_problem"],
    )


def webhook_endpoint(body: Json) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=body["id"],
        url=body["url"],
        event_types=tuple(body["event_types"]),
        enabled=body["enabled"],
        disabled_reason=body["disabled_reason"],
        created_at=_time(body["created_at"]),
        secret=body.get("secret"),
    )


def webhook_endpoints(body: list[Json]) -> list[WebhookEndpoint]:
    return [webhook_endpoint(row) for row in body]


def webhook_secret(body: Json) -> str | None:
    secret: str | None = body["secret"]
    return secret


def webhook_delivery(body: Json) -> WebhookDelivery:
    return WebhookDelivery(
        id=body["id"],
        endpoint_id=body["endpoint_id"],
        event_id=body["event_id"],
        status=body["status"],
        attempts=body["attempts"],
        next_attempt_at=_time(body["next_attempt_at"]),
        last_status_code=body["last_status_code"],
        last_error=body["last_error"],
        delivered_at=_maybe_time(body["delivered_at"]),
        created_at=_time(body["created_at"]),
    )


def page_of(item: Callable[[Json], T]) -> Callable[[Json], Page[T]]:
    """A reader of ``{"data": [...], "next_cursor": n}`` pages of `item`s."""

    def read(body: Json) -> Page[T]:
        return Page(tuple(item(row) for row in body["data"]), body["next_cursor"])

    return read
