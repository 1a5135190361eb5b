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
    """One asset of an agent: what it can spend, and what it has locked as a buyer."""

    asset: str
    decimals: int
    available_base_units: int
    escrowed_as_buyer_base_units: int


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
