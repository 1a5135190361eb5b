"""The webhook events escrowd sends, described in /openapi.json under ``webhooks``.

One OpenAPI 3.1 webhook per event type, with its payload schema, an example and the
headers of a delivery. The models here are documentation and the contract the tests hold
the emitting code to (tests/test_api_webhooks.py); the payloads themselves are written by
escrow.events in the transaction of the change they report.
"""

# No `from __future__ import annotations`: FastAPI reads the receivers' signatures.
import inspect
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Response
from pydantic import BaseModel, Field, create_model

from escrowd.daemon.api_schemas import BaseUnits
from escrowd.escrow import webhooks
from escrowd.escrow.events import API_VERSION, EVENT_TYPES

TxHash = Annotated[str, Field(description="EVM transaction hash or Solana signature.")]


class DepositEventData(BaseModel):
    deposit_id: int = Field(description="The deposit's id, as GET /v1/deposits shows it.")
    agent: str = Field(description="The marketplace's id of the agent credited.")
    network: str = Field(description="The network the deposit arrived on, e.g. base.")
    asset: str
    amount_base_units: BaseUnits = Field(description="The amount in the token's base units.")
    tx_hash: TxHash
    log_index: int = Field(description="EVM log index; on Solana the balance change's index.")
    block_number: int = Field(description="EVM block number or Solana slot.")
    status: Literal["pending", "confirmed", "orphaned"]
    decimals: int = Field(description="Decimals of the token on this network.")
    credit_state: Literal["none", "credited", "dust", "refused", "reversed", "reversal_short"] = (
        Field(
            description="What happened to its credit: none yet, credited, dust (below one "
            "ledger unit, held on chain), refused (too large), reversed (a reorg took it "
            "back), reversal_short (the reversal fell short: the agent had spent it)."
        )
    )
    credited_base_units: BaseUnits = Field(
        description="Credited to the agent, in the asset's ledger units."
    )
    reversal_shortfall_base_units: BaseUnits = Field(
        description="With reversal_short: the credit that could not be taken back."
    )
    dust_base_units: BaseUnits = Field(
        description="Token base units below one ledger unit, held on chain, not credited."
    )
    credit_note: str | None = Field(description="Why it was not credited in full, if so.")


class UnsupportedDepositEventData(BaseModel):
    unsupported_deposit_id: int
    agent: str = Field(description="The marketplace's id of the agent whose address received.")
    network: str
    token_address: str = Field(description="The ERC-20 contract: not a supported asset.")
    amount_base_units: BaseUnits = Field(description="In that token's base units; never credited.")
    tx_hash: TxHash
    log_index: int
    block_number: int
    from_address: str
    to_address: str = Field(description="The deposit address.")
    recovery_id: int | None = Field(description="The operator's recovery moving it, if any.")


class EscrowEventData(BaseModel):
    job_id: str = Field(description="The marketplace's id of the job; names the escrow.")
    status: Literal["funded", "released", "refunded", "resolved", "expired"]
    buyer: str = Field(description="The marketplace's id of the buyer agent.")
    worker: str = Field(description="The marketplace's id of the worker agent.")
    asset: str
    amount_base_units: BaseUnits
    fee_bps: int
    worker_amount_base_units: BaseUnits | None = Field(
        description="Paid to the worker, net of the fee; null until settled."
    )
    fee_amount_base_units: BaseUnits | None
    refund_amount_base_units: BaseUnits | None


class _PayoutEventData(BaseModel):
    payout_id: int = Field(description="The payout's id, as GET /v1/withdrawals shows it.")
    agent: str | None = Field(description="The marketplace's id of the agent paid out.")
    network: str = Field(description="The network the payout is sent on, e.g. base.")
    asset: str
    destination: str
    amount_base_units: BaseUnits
    reason: Literal["withdrawal", "release", "refund"]
    tx_hash: TxHash | None = Field(description="Null until a transaction was signed for it.")


class PayoutRequestedData(_PayoutEventData):
    status: Literal["requested"]
    reference: str = Field(description="What the payout is for, e.g. agent:<id>.")


class PayoutSentData(_PayoutEventData):
    status: Literal["signed", "broadcast"]


class PayoutConfirmedData(_PayoutEventData):
    status: Literal["confirmed"]
    block_number: int = Field(description="EVM block number or Solana slot it landed in.")


class PayoutFailedData(_PayoutEventData):
    status: Literal["failed"]
    error: str = Field(description="Why it failed; the held amount is available again.")


class PayoutWaitingData(_PayoutEventData):
    status: Literal["waiting_funds"]
    status_reason: str = Field(description="What the hot wallet lacks (token, gas or fee).")


class PayoutAttentionData(_PayoutEventData):
    status: Literal["needs_attention"]
    status_reason: str = Field(description="The unexpected error that parked it.")


class PayoutCancelledData(_PayoutEventData):
    status: Literal["cancelled"]
    status_reason: str = Field(description="The operator's reason; the hold is released.")


class PayoutRetriedData(_PayoutEventData):
    status: str = Field(description="The state it resumes in.")
    previous_status: str = Field(description="The state it was retried from.")


class SubscriptionChargeData(BaseModel):
    period_index: int
    period_start: str = Field(description="RFC 3339 start of the period.")
    status: Literal["succeeded", "failed"]
    attempts: int
    payee_amount_base_units: BaseUnits | None
    fee_amount_base_units: BaseUnits | None
    error: str | None = Field(description="Why the last attempt failed.")


class _SubscriptionEventData(BaseModel):
    subscription_id: str = Field(description="The marketplace's id of the subscription.")
    status: Literal["active", "paused", "canceled"]
    buyer: str
    worker: str | None
    payee: Literal["worker", "platform"]
    asset: str
    amount_base_units: BaseUnits
    fee_bps: int
    interval: Literal["day", "week", "month"]
    interval_count: int
    next_period_index: int
    next_charge_at: str | None = Field(description="RFC 3339; null unless active.")


class SubscriptionCreatedData(_SubscriptionEventData):
    anchor_at: str = Field(description="RFC 3339 start of period 0.")


class SubscriptionChargeEventData(_SubscriptionEventData):
    charge: SubscriptionChargeData


class SubscriptionResumedData(_SubscriptionEventData):
    pass


class SubscriptionCanceledData(_SubscriptionEventData):
    requested_by: Literal["buyer", "marketplace"]


class SubscriptionSkippedData(_SubscriptionEventData):
    skipped_from_period: int
    skipped_to_period: int
    reason: Literal["paused", "catch_up_limit"]


_DEPOSIT = {
    "deposit_id": 41,
    "agent": "agent-7f3a",
    "network": "base",
    "asset": "USDC",
    "amount_base_units": "25000000",
    "tx_hash": "0x5c504ed432cb51138bcf09aa5e8a410dd4a1e204ef84bfed1be16dfba1b22060",
    "log_index": 3,
    "block_number": 21873001,
    "decimals": 6,
    "credit_state": "none",
    "credited_base_units": "0",
    "reversal_shortfall_base_units": "0",
    "dust_base_units": "0",
    "credit_note": None,
}
_CREDITED = {"credit_state": "credited", "credited_base_units": "25000000"}
_ESCROW = {
    "job_id": "job-1842",
    "buyer": "agent-7f3a",
    "worker": "agent-c210",
    "asset": "USDC",
    "amount_base_units": "12500000",
    "fee_bps": 250,
    "worker_amount_base_units": None,
    "fee_amount_base_units": None,
    "refund_amount_base_units": None,
}
_RELEASED = {
    "worker_amount_base_units": "12187500",
    "fee_amount_base_units": "312500",
    "refund_amount_base_units": "0",
}
_REFUNDED = {
    "worker_amount_base_units": "0",
    "fee_amount_base_units": "0",
    "refund_amount_base_units": "12500000",
}
_PAYOUT = {
    "payout_id": 17,
    "agent": "agent-c210",
    "network": "base",
    "asset": "USDC",
    "destination": "0x8ba1f109551bD432803012645Ac136ddd64DBA72",
    "amount_base_units": "10000000",
    "reason": "withdrawal",
    "tx_hash": None,
}
_PAYOUT_TX = "0x9fc76417374aa880d4449a1f7f31ec597f00b1f6f3dd2d66f4c9c6c445836d8b"
_SUBSCRIPTION = {
    "subscription_id": "sub-88",
    "status": "active",
    "buyer": "agent-7f3a",
    "worker": "agent-c210",
    "payee": "worker",
    "asset": "USDC",
    "amount_base_units": "5000000",
    "fee_bps": 250,
    "interval": "month",
    "interval_count": 1,
    "next_period_index": 1,
    "next_charge_at": "2027-01-01T00:00:00Z",
}
_CHARGE = {
    "period_index": 0,
    "period_start": "2026-12-01T00:00:00Z",
    "status": "succeeded",
    "attempts": 1,
    "payee_amount_base_units": "4875000",
    "fee_amount_base_units": "125000",
    "error": None,
}
_FAILED_CHARGE = {
    **_CHARGE,
    "status": "failed",
    "payee_amount_base_units": None,
    "fee_amount_base_units": None,
    "error": "agent-7f3a has 1000000 USDC base units available, 5000000 needed",
}

# type -> (data model, what it reports, example data)
EVENTS: dict[str, tuple[type[BaseModel], str, dict[str, Any]]] = {
    "deposit.pending": (
        DepositEventData,
        "A deposit was seen on chain; it is credited when it reaches the network's "
        "confirmation depth (Solana: finalized).",
        {**_DEPOSIT, "status": "pending"},
    ),
    "deposit.confirmed": (
        DepositEventData,
        "A deposit reached its confirmation depth and the agent's available balance was credited.",
        {**_DEPOSIT, **_CREDITED, "status": "confirmed"},
    ),
    "deposit.orphaned": (
        DepositEventData,
        "A deposit's block left the canonical chain; if it had been credited, the credit "
        "was reversed.",
        {**_DEPOSIT, "status": "orphaned"},
    ),
    "deposit.unsupported": (
        UnsupportedDepositEventData,
        "A token other than the supported asset reached a deposit address; it is never "
        "credited (an operator can move it with `escrowd tokens recover`).",
        {
            "unsupported_deposit_id": 3,
            "agent": "agent-7f3a",
            "network": "base",
            "token_address": "0x50c5725949A6F0c72E6C4a641F24049A917DB0Cb",
            "amount_base_units": "5000000000000000000",
            "tx_hash": "0x1d0e3c2b0b1f4f6a8a47b5b7e2a4e4d2f01a7c4c8b0c6f5a9e0d2f3b4c5d6e7f",
            "log_index": 0,
            "block_number": 21873020,
            "from_address": "0x3f5CE5FBFe3E9af3971dD833D26bA9b5C936f0bE",
            "to_address": "0x71C7656EC7ab88b098defB751B7401B5f6d8976F",
            "recovery_id": None,
        },
    ),
    "escrow.funded": (
        EscrowEventData,
        "The buyer's available balance moved into the escrow of a job.",
        {**_ESCROW, "status": "funded"},
    ),
    "escrow.released": (
        EscrowEventData,
        "The worker was paid the amount minus the fee.",
        {**_ESCROW, **_RELEASED, "status": "released"},
    ),
    "escrow.refunded": (
        EscrowEventData,
        "The whole amount went back to the buyer (also after an expiry).",
        {**_ESCROW, **_REFUNDED, "status": "refunded"},
    ),
    "escrow.resolved": (
        EscrowEventData,
        "A dispute split the amount between worker (minus the fee on that part) and buyer.",
        {
            **_ESCROW,
            "status": "resolved",
            "worker_amount_base_units": "7312500",
            "fee_amount_base_units": "187500",
            "refund_amount_base_units": "5000000",
        },
    ),
    "escrow.expired": (
        EscrowEventData,
        "The escrow passed its expires_at unsettled; escrow.refunded follows.",
        {**_ESCROW, "status": "expired"},
    ),
    "payout.requested": (
        PayoutRequestedData,
        "A payout was requested and its amount held from the agent's balance.",
        {**_PAYOUT, "status": "requested", "reference": "agent:agent-c210"},
    ),
    "payout.signed": (
        PayoutSentData,
        "The payout's transaction was signed and stored; it is sent next.",
        {**_PAYOUT, "status": "signed", "tx_hash": _PAYOUT_TX},
    ),
    "payout.broadcast": (
        PayoutSentData,
        "The payout's transaction was sent to the network.",
        {**_PAYOUT, "status": "broadcast", "tx_hash": _PAYOUT_TX},
    ),
    "payout.confirmed": (
        PayoutConfirmedData,
        "The payout's transaction reached the network's confirmation depth.",
        {**_PAYOUT, "status": "confirmed", "tx_hash": _PAYOUT_TX, "block_number": 21873090},
    ),
    "payout.failed": (
        PayoutFailedData,
        "The payout failed for good; the held amount is available to the agent again.",
        {
            **_PAYOUT,
            "status": "failed",
            "tx_hash": _PAYOUT_TX,
            "error": "reverted on chain",
        },
    ),
    "payout.waiting_funds": (
        PayoutWaitingData,
        "The hot wallet cannot cover the payout (token and network fee) now: nothing is "
        "signed until it can; top up the wallet.",
        {
            **_PAYOUT,
            "status": "waiting_funds",
            "status_reason": "hot wallet holds 0 USDC token base units and 0 wei",
        },
    ),
    "payout.needs_attention": (
        PayoutAttentionData,
        "An unexpected error parked the payout; its hold stays until an operator retries "
        "or cancels it.",
        {**_PAYOUT, "status": "needs_attention", "status_reason": "ValueError: bad data"},
    ),
    "payout.retried": (
        PayoutRetriedData,
        "An operator handed the payout back to the workers.",
        {**_PAYOUT, "status": "requested", "previous_status": "needs_attention"},
    ),
    "payout.cancelled": (
        PayoutCancelledData,
        "An operator cancelled the payout once nothing signed for it could land; the held "
        "amount is available to the agent again.",
        {**_PAYOUT, "status": "cancelled", "status_reason": "destination closed"},
    ),
    "subscription.created": (
        SubscriptionCreatedData,
        "A buyer authorized a recurring charge.",
        {**_SUBSCRIPTION, "anchor_at": "2026-12-01T00:00:00Z"},
    ),
    "subscription.charged": (
        SubscriptionChargeEventData,
        "One period was charged: the buyer paid the payee (minus the fee).",
        {**_SUBSCRIPTION, "charge": _CHARGE},
    ),
    "subscription.charge_failed": (
        SubscriptionChargeEventData,
        "A period's charge found too little balance; it is retried after retry_after_s.",
        {**_SUBSCRIPTION, "charge": _FAILED_CHARGE},
    ),
    "subscription.paused": (
        SubscriptionChargeEventData,
        "A period failed max_charge_attempts times: nothing is charged until it is resumed.",
        {**_SUBSCRIPTION, "status": "paused", "next_charge_at": None, "charge": _FAILED_CHARGE},
    ),
    "subscription.resumed": (
        SubscriptionResumedData,
        "A paused subscription is active again; the current period is charged now.",
        _SUBSCRIPTION,
    ),
    "subscription.canceled": (
        SubscriptionCanceledData,
        "The subscription stopped for good (charges made stay made).",
        {
            **_SUBSCRIPTION,
            "status": "canceled",
            "next_charge_at": None,
            "requested_by": "marketplace",
        },
    ),
    "subscription.periods_skipped": (
        SubscriptionSkippedData,
        "Periods that will never be charged: passed while paused, or beyond the catch-up "
        "limit after downtime.",
        {
            **_SUBSCRIPTION,
            "skipped_from_period": 2,
            "skipped_to_period": 4,
            "reason": "catch_up_limit",
        },
    ),
}
assert set(EVENTS) == EVENT_TYPES, "every event type is documented"


def _model_name(event_type: str) -> str:
    family, _, action = event_type.partition(".")
    return f"{family.title()}{action.title()}Event"


def event_model(event_type: str) -> type[BaseModel]:
    """The whole payload of one event type: ``{"type", "api_version", "data"}``."""
    data_model = EVENTS[event_type][0]
    model: type[BaseModel] = create_model(
        _model_name(event_type),
        type=(Literal[event_type], ...),  # type: ignore[arg-type]
        api_version=(
            Literal[API_VERSION],  # type: ignore[arg-type]
            Field(description="The payload version; see the API description."),
        ),
        data=(data_model, ...),
    )
    return model


EVENT_MODELS = {event_type: event_model(event_type) for event_type in sorted(EVENTS)}

_DELIVERY_HEADERS = [
    (
        webhooks.STANDARD_ID_HEADER,
        "The event id (also Escrowd-Event-Id): the same on every retry; de-duplicate on it.",
    ),
    (webhooks.STANDARD_TIMESTAMP_HEADER, "Unix seconds when this attempt was signed."),
    (
        webhooks.STANDARD_SIGNATURE_HEADER,
        'Standard Webhooks signature "v1,<base64>": HMAC-SHA256 keyed with the bytes of '
        'the secret after whsec_, over "<webhook-id>.<webhook-timestamp>.<body>".',
    ),
    (
        webhooks.SIGNATURE_HEADER,
        '"t=<unix>,v1=<hex>": HMAC-SHA256 keyed with the whole secret string over '
        '"<t>.<body>" (escrowd.escrow.webhooks.verify_webhook).',
    ),
    (webhooks.EVENT_ID_HEADER, "The event id."),
    (webhooks.EVENT_TYPE_HEADER, "The event type, as in the body's type."),
]


def example(event_type: str) -> dict[str, Any]:
    """A whole example payload of an event type."""
    return {"type": event_type, "api_version": API_VERSION, "data": EVENTS[event_type][2]}


def add_examples(openapi: dict[str, Any]) -> None:
    """Put each event's example into a generated OpenAPI document. Done on the finished
    document: FastAPI drops null values from examples it renders, and events have nulls."""
    for event_type, item in openapi.get("webhooks", {}).items():
        content = item["post"]["requestBody"]["content"]["application/json"]
        content["examples"] = {"example": {"summary": event_type, "value": example(event_type)}}


def _receiver(model: type[BaseModel]) -> Any:
    def receive(**_: Any) -> Response:
        return Response(status_code=204)

    body = Body()
    # A signature FastAPI reads: one body parameter of the event's model.
    receive.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "event",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[model, body],
            )
        ]
    )
    return receive


def document_webhooks(app: FastAPI) -> None:
    """Add every event type to the app's OpenAPI ``webhooks`` (`add_examples` adds the
    examples to the generated document)."""
    parameters = [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
        | {"description": text}
        for name, text in _DELIVERY_HEADERS
    ]
    for event_type, model in EVENT_MODELS.items():
        summary = EVENTS[event_type][1]
        app.webhooks.post(
            event_type,
            summary=summary,
            description=f"{summary} Answer 2xx within webhooks.timeout_s; anything else is "
            "retried with backoff, in order per endpoint.",
            status_code=204,
            response_class=Response,
            response_description="Received.",
            openapi_extra={"parameters": parameters},
            tags=["webhook events"],
            operation_id=event_type.replace(".", "_"),
        )(_receiver(model))
