"""Values the HTTP API returns beyond those `EscrowService` shares (escrow.values), and the
readers that turn the API's JSON into values.

Amounts are integers in base units (read from the ``*_base_units`` strings, never from
the decimal strings), times timezone-aware UTC. Words as in the API: a *chain family* is
an address format (``evm``, ``solana``), a *network* one configured chain (``base``,
``solana``). `Escrow` and `Withdrawal` here are the in-process values with what the API
tells besides (the deposit an escrow was funded from, a payout's transaction and progress).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, get_args

from escrowd.escrow import values as plain
from escrowd.escrow.values import (
    Agent,
    Balance,
    EscrowState,
    Subscription,
    SubscriptionCharge,
)

T = TypeVar("T")
Json = Mapping[str, Any]
ChainFamily = Literal["evm", "solana"]
_STATES: dict[str, EscrowState] = {state: state for state in get_args(EscrowState)}
_FAMILIES: dict[str, ChainFamily] = {family: family for family in get_args(ChainFamily)}


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list; pass `next_cursor` as `cursor` for the next (None: last page)."""

    items: tuple[T, ...]
    next_cursor: int | None


@dataclass(frozen=True, slots=True)
class DepositAddress:
    """An agent's address for a chain family; it receives on each of `networks`."""

    agent: str
    chain_family: ChainFamily
    networks: tuple[str, ...]
    address: str
    derivation_index: int
    token_account: str | None


@dataclass(frozen=True, slots=True)
class Deposit:
    """A deposit seen on `network`. `amount_base_units` is in the token's base units;
    `credited_base_units` (what the agent was credited) in the asset's ledger units.
    `credit_state`: none, credited, dust, refused, reversed or reversal_short."""

    id: int
    agent: str
    network: str
    chain_family: ChainFamily
    asset: str
    amount_base_units: int
    tx_hash: str
    log_index: int
    block_number: int
    status: str
    credited: bool
    credit_state: str
    credited_base_units: int
    reversal_shortfall_base_units: int
    dust_base_units: int
    credit_note: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class FundingDeposit:
    """The deposit an escrow was funded from (POST /v1/deposit-funded-escrows);
    `depositor_address` sent the on-chain transfer."""

    deposit_id: int
    network: str
    tx_hash: str
    log_index: int
    depositor_address: str | None


@dataclass(frozen=True, slots=True)
class Escrow(plain.Escrow):
    """The in-process value, and the deposit it was funded from (None: from a balance)."""

    funded_from_deposit: FundingDeposit | None = None


@dataclass(frozen=True, slots=True)
class Withdrawal(plain.Withdrawal):
    """A payout to an agent as GET /v1/withdrawals shows it: a withdrawal (`reason`
    withdrawal) or an escrow's payout sent on chain (release, refund). `chain` (of the
    in-process value) holds the network's name, as `network` does.

    `status`: requested, signed, broadcast, confirmed, failed (or an operator state:
    waiting_funds, needs_attention, cancelled). `tx_hash` is the newest transaction
    signed for it; `confirmations` counts EVM blocks up to the newest one escrowd
    scanned (None on Solana, where confirmed means finalized, and before a block)."""

    network: str
    chain_family: ChainFamily
    reason: str
    tx_hash: str | None
    block_number: int | None
    confirmations: int | None
    failure_reason: str | None
    updated_at: datetime
    broadcast_at: datetime | None
    confirmed_at: datetime | None


@dataclass(frozen=True, slots=True)
class NetworkAsset:
    """`token_address`: the ERC-20 contract or SPL mint; None for the native coin."""

    asset: str
    decimals: int
    token_address: str | None


@dataclass(frozen=True, slots=True)
class Network:
    """A configured network: what `network=` takes. `confirmations`: EVM blocks a
    deposit waits for (None on Solana, which waits for finalized)."""

    network: str
    chain_family: ChainFamily
    chain_id: int | None
    confirmations: int | None
    assets: tuple[NetworkAsset, ...]


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
    funded_from = body.get("funded_from_deposit")
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
        funded_from_deposit=None if funded_from is None else funding_deposit(funded_from),
    )


def funding_deposit(body: Json) -> FundingDeposit:
    return FundingDeposit(
        deposit_id=body["deposit_id"],
        network=body["network"],
        tx_hash=body["tx_hash"],
        log_index=body["log_index"],
        depositor_address=body["depositor_address"],
    )


def balances(body: Json) -> list[Balance]:
    return [
        Balance(
            asset=row["asset"],
            decimals=row["decimals"],
            available_base_units=int(row["available_base_units"]),
            escrowed_as_buyer_base_units=int(row["escrowed_as_buyer_base_units"]),
            incoming_base_units=int(row["incoming_base_units"]),
            pending_withdrawals_base_units=int(row["pending_withdrawals_base_units"]),
        )
        for row in body["balances"]
    ]


def withdrawal(body: Json) -> Withdrawal:
    return Withdrawal(
        id=body["id"],
        agent=body["agent_id"],
        chain=body["network"],
        asset=body["asset"],
        destination=body["destination"],
        amount_base_units=int(body["amount_base_units"]),
        status=body["status"],
        created_at=_time(body["created_at"]),
        network=body["network"],
        chain_family=_FAMILIES[body["chain_family"]],
        reason=body["reason"],
        tx_hash=body["tx_hash"],
        block_number=body["block_number"],
        confirmations=body["confirmations"],
        failure_reason=body["failure_reason"],
        updated_at=_time(body["updated_at"]),
        broadcast_at=_maybe_time(body["broadcast_at"]),
        confirmed_at=_maybe_time(body["confirmed_at"]),
    )


def network(body: Json) -> Network:
    return Network(
        network=body["network"],
        chain_family=_FAMILIES[body["chain_family"]],
        chain_id=body["chain_id"],
        confirmations=body["confirmations"],
        assets=tuple(
            NetworkAsset(
                asset=row["asset"], decimals=row["decimals"], token_address=row["token_address"]
            )
            for row in body["assets"]
        ),
    )


def networks(body: list[Json]) -> list[Network]:
    return [network(row) for row in body]


def deposit_address(body: Json) -> DepositAddress:
    return DepositAddress(
        agent=body["agent_id"],
        chain_family=_FAMILIES[body["chain_family"]],
        networks=tuple(body["networks"]),
        address=body["address"],
        derivation_index=body["derivation_index"],
        token_account=body["token_account"],
    )


def deposit(body: Json) -> Deposit:
    return Deposit(
        id=body["id"],
        agent=body["agent_id"],
        network=body["network"],
        chain_family=_FAMILIES[body["chain_family"]],
        asset=body["asset"],
        amount_base_units=int(body["amount_base_units"]),
        tx_hash=body["tx_hash"],
        log_index=body["log_index"],
        block_number=body["block_number"],
        status=body["status"],
        credited=body["credited"],
        credit_state=body["credit_state"],
        credited_base_units=int(body["credited_base_units"]),
        reversal_shortfall_base_units=int(body["reversal_shortfall_base_units"]),
        dust_base_units=int(body["dust_base_units"]),
        credit_note=body["credit_note"],
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


def subscription(body: Json) -> Subscription:
    return Subscription(
        id=body["id"],
        status=body["status"],
        buyer=body["buyer"],
        worker=body["worker"],
        asset=body["asset"],
        amount_base_units=int(body["amount_base_units"]),
        fee_bps=body["fee_bps"],
        interval=body["interval"],
        interval_count=body["interval_count"],
        starts_at=_time(body["starts_at"]),
        next_period_index=body["next_period_index"],
        next_charge_at=_maybe_time(body["next_charge_at"]),
        paused_at=_maybe_time(body["paused_at"]),
        canceled_at=_maybe_time(body["canceled_at"]),
        canceled_by=body["canceled_by"],
        created_at=_time(body["created_at"]),
    )


def subscription_charge(body: Json) -> SubscriptionCharge:
    return SubscriptionCharge(
        period_index=body["period_index"],
        period_start=_time(body["period_start"]),
        status=body["status"],
        attempts=body["attempts"],
        amount_base_units=int(body["amount_base_units"]),
        payee_amount_base_units=_maybe_int(body["payee_amount_base_units"]),
        fee_amount_base_units=_maybe_int(body["fee_amount_base_units"]),
        error=body["error"],
        charged_at=_maybe_time(body["charged_at"]),
    )


def page_of(item: Callable[[Json], T]) -> Callable[[Json], Page[T]]:
    """A reader of ``{"data": [...], "next_cursor": n}`` pages of `item`s."""

    def read(body: Json) -> Page[T]:
        return Page(tuple(item(row) for row in body["data"]), body["next_cursor"])

    return read
