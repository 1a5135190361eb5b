"""Request and response bodies of the HTTP API.

Amounts travel as decimal strings in the asset's units ("12.5") next to the same value in
base units as a string of digits (``amount_base_units``), so no client parses money
through a float.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ExternalId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
DecimalString = Annotated[
    str, Field(max_length=40, pattern=r"^(0|[1-9][0-9]*)(\.[0-9]+)?$", examples=["12.5"])
]
BaseUnits = Annotated[str, Field(pattern=r"^-?[0-9]+$")]
AssetSymbol = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[A-Z0-9]+$")]
ChainName = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_-]*$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class AgentCreate(_Body):
    id: ExternalId = Field(description="The marketplace's own id of the agent.")
    name: Annotated[str, Field(max_length=200)] | None = None


class AgentOut(BaseModel):
    id: str
    name: str | None
    created_at: datetime


class DepositAddressOut(BaseModel):
    agent_id: str
    chain: str
    address: str
    derivation_index: int
    token_account: str | None


class BalanceOut(BaseModel):
    asset: str
    decimals: int
    available: str
    available_base_units: BaseUnits
    escrowed_as_buyer: str
    escrowed_as_buyer_base_units: BaseUnits


class BalancesOut(BaseModel):
    agent_id: str
    balances: list[BalanceOut]


class DepositOut(BaseModel):
    id: int
    agent_id: str
    chain: str
    asset: str
    amount: str
    amount_base_units: BaseUnits
    tx_hash: str
    log_index: int
    block_number: int
    status: str
    credited: bool
    created_at: datetime


class DepositPage(BaseModel):
    data: list[DepositOut]
    next_cursor: int | None = Field(description="Pass as ?cursor= for the next page.")


class EscrowCreate(_Body):
    job_id: ExternalId
    buyer: ExternalId
    worker: ExternalId
    asset: AssetSymbol
    amount: DecimalString
    fee_bps: Annotated[int, Field(ge=0, le=10_000)] | None = Field(
        default=None, description="Platform fee in basis points; defaults to the configured fee."
    )
    expires_at: datetime | None = None


class EscrowResolve(_Body):
    worker_amount: DecimalString = Field(
        description="Part of the escrow awarded to the worker (0 to amount); the worker "
        "gets it minus the fee on it, the buyer gets the rest."
    )


class EscrowDepositOut(BaseModel):
    """The deposit an escrow was funded from (POST /v1/escrows/from-deposit)."""

    deposit_id: int
    chain: str
    tx_hash: str
    log_index: int
    depositor_address: str | None = Field(
        description="Sender of the on-chain transfer: the ERC-20 Transfer's `from` on EVM, "
        "the source owner on Solana."
    )


class EscrowOut(BaseModel):
    job_id: str
    status: Literal["funded", "released", "refunded", "resolved", "expired"]
    buyer: str
    worker: str
    asset: str
    amount: str
    amount_base_units: BaseUnits
    fee_bps: int
    worker_amount: str | None
    worker_amount_base_units: BaseUnits | None
    fee_amount: str | None
    fee_amount_base_units: BaseUnits | None
    refund_amount: str | None
    refund_amount_base_units: BaseUnits | None
    expires_at: datetime | None
    resolved_at: datetime | None
    created_at: datetime
    funded_from_deposit: EscrowDepositOut | None = Field(
        default=None, description="Null for an escrow funded from the buyer's balance."
    )


class WithdrawalCreate(_Body):
    agent_id: ExternalId
    asset: AssetSymbol
    chain: ChainName
    to_address: Annotated[str, Field(min_length=1, max_length=64)]
    amount: DecimalString


class WithdrawalOut(BaseModel):
    id: int
    agent_id: str
    chain: str
    asset: str
    destination: str
    amount: str
    amount_base_units: BaseUnits
    status: str
    created_at: datetime


class AuditRowOut(BaseModel):
    id: int
    stream: str
    seq: int
    actor: str
    action: str
    asset: str | None
    amount_base_units: BaseUnits | None
    details: dict[str, Any]
    created_at: datetime
    row_hash: str


class AuditPage(BaseModel):
    data: list[AuditRowOut]
    next_cursor: int | None


class AuditVerifyOut(BaseModel):
    ok: bool
    rows_checked: int
    streams_checked: int
    first_problem: str | None


class WebhookEndpointCreate(_Body):
    url: Annotated[str, Field(min_length=1, max_length=2000)]
    event_types: Annotated[list[str], Field(min_length=1, max_length=50)] = ["*"]


class WebhookEndpointOut(BaseModel):
    id: int
    url: str
    event_types: list[str]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str | None = Field(
        description="The signing secret, returned once. An idempotent replay of the same "
        "request returns null here: the secret is never stored in plain text."
    )


class WebhookSecretOut(BaseModel):
    endpoint_id: int
    secret: str | None = Field(description="The new signing secret (null on a replay).")


class DeliveryOut(BaseModel):
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


class DeliveryPage(BaseModel):
    data: list[DeliveryOut]
    next_cursor: int | None
