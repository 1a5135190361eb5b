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


class PayoutRequestedData(_PayoutEventData):
    status: Literal["requested"]
    reference: str = Field(description="What the payout is for, e.g. agent:<id>.")


class PayoutSentData(_PayoutEventData):
    status: Literal["signed", "broadcast"]
    tx_hash: TxHash


class PayoutConfirmedData(_PayoutEventData):
    status: Literal["confirmed"]
    tx_hash: TxHash
    block_number: int = Field(description="EVM block number or Solana slot it landed in.")


class PayoutFailedData(_PayoutEventData):
    status: Literal["failed"]
    tx_hash: TxHash | None = Field(description="Null when it failed before being signed.")
    error: str = Field(description="Why it failed; the held amount is available again.")


_DEPOSIT = {
    "deposit_id": 41,
    "agent": "agent-7f3a",
    "network": "base",
    "asset": "USDC",
    "amount_base_units": "25000000",
    "tx_hash": "0x5c504ed432cb51138bcf09aa5e8a410dd4a1e204ef84bfed1be16dfba1b22060",
    "log_index": 3,
    "block_number": 21873001,
}
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
}
_PAYOUT_TX = "0x9fc76417374aa880d4449a1f7f31ec597f00b1f6f3dd2d66f4c9c6c445836d8b"

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
        {**_DEPOSIT, "status": "confirmed"},
    ),
    "deposit.orphaned": (
        DepositEventData,
        "A deposit's block left the canonical chain; if it had been credited, the credit "
        "was reversed.",
        {**_DEPOSIT, "status": "orphaned"},
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
