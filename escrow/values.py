"""The plain values a backend gets back from escrowd, in process or over HTTP.

`EscrowService`, `AsyncEscrowService` and `escrowd.client` return these: frozen, with
no database session behind them, safe to keep, compare and pass between threads. Agents
are named by the marketplace's own ids, amounts are integers in base units and times are
timezone-aware UTC. Field names follow the HTTP API's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

EscrowState = Literal["funded", "released", "refunded", "resolved", "expired"]


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    name: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Escrow:
    """The outcome amounts are None until the escrow is settled."""

    job_id: str
    status: EscrowState
    buyer: str
    worker: str
    asset: str
    amount_base_units: int
    fee_bps: int
    worker_amount_base_units: int | None
    fee_amount_base_units: int | None
    refund_amount_base_units: int | None
    expires_at: datetime | None
    resolved_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Balance:
    """One asset of an agent: what it can spend, what it has locked as a buyer, what is on
    its way in and what is on its way out."""

    asset: str
    decimals: int
    available_base_units: int
    escrowed_as_buyer_base_units: int
    # Deposits seen, not yet confirmed (in the asset's ledger units, rounded down).
    incoming_base_units: int = 0
    # Held for withdrawals neither confirmed nor failed.
    pending_withdrawals_base_units: int = 0


@dataclass(frozen=True, slots=True)
class Withdrawal:
    """A payout an agent asked for; `id` is the one GET/POST /v1/withdrawals shows."""

    id: int
    agent: str
    chain: str
    asset: str
    destination: str
    amount_base_units: int
    status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Subscription:
    """A recurring charge: `amount_base_units` of `asset` from `buyer` every
    `interval_count` `interval`s, to `worker` (minus `fee_bps`) or, with no worker, to the
    platform. Period k starts k intervals after `starts_at`."""

    id: str
    status: str
    buyer: str
    worker: str | None
    asset: str
    amount_base_units: int
    fee_bps: int
    interval: str
    interval_count: int
    starts_at: datetime
    next_period_index: int
    next_charge_at: datetime | None
    paused_at: datetime | None
    canceled_at: datetime | None
    canceled_by: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class SubscriptionCharge:
    """One period's charge; the payee and fee amounts are None until it succeeded."""

    period_index: int
    period_start: datetime
    status: str
    attempts: int
    amount_base_units: int
    payee_amount_base_units: int | None
    fee_amount_base_units: int | None
    error: str | None
    charged_at: datetime | None
