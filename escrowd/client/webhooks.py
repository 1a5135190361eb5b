"""Receiving escrowd's webhooks: check the signature, then read the event into a type.

    event = verify_webhook(await request.body(), request.headers, secret)
    if isinstance(event, EscrowEvent) and event.type == "escrow.released": ...

Check the signature over the raw body bytes exactly as received (parsing and re-encoding
the JSON changes them). Delivery is at least once: de-duplicate on `event.id`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from escrowd.config.errors import ValidationFailed
from escrowd.escrow.values import EscrowState

EVENT_ID_HEADER = "Escrowd-Event-Id"


class WebhookPayloadInvalid(ValidationFailed):
    """A webhook body that is not an escrowd event of its stated type."""

    type = "webhook_payload_invalid"


class _Model(BaseModel):
    # Fields added by a newer server (same api_version) are ignored, not refused.
    model_config = ConfigDict(frozen=True, extra="ignore")


class EscrowEventData(_Model):
    job_id: str
    status: EscrowState
    buyer: str
    worker: str
    asset: str
    amount_base_units: int
    fee_bps: int
    worker_amount_base_units: int | None = None
    fee_amount_base_units: int | None = None
    refund_amount_base_units: int | None = None


class DepositEventData(_Model):
    """`agent`: the marketplace's id of the agent credited."""

    deposit_id: int
    agent: str | None = None
    network: str
    asset: str
    amount_base_units: int
    tx_hash: str
    log_index: int
    block_number: int
    status: str
    # What happened to its credit (none, credited, dust, refused, reversed, reversal_short),
    # in the asset's ledger units.
    credit_state: str = "none"
    credited_base_units: int = 0
    reversal_shortfall_base_units: int = 0


class PayoutEventData(_Model):
    """`payout_id` is the withdrawal's id in GET/POST /v1/withdrawals."""

    payout_id: int
    agent: str | None = None
    network: str
    asset: str
    destination: str
    amount_base_units: int
    reason: str
    status: str
    tx_hash: str | None = None
    # Why it waits, was parked or was cancelled (waiting_funds, needs_attention, cancelled).
    status_reason: str | None = None


class _Event(_Model):
    """`id`: the Escrowd-Event-Id header, the key to de-duplicate deliveries on."""

    id: str | None = None
    type: str
    api_version: str


class EscrowEvent(_Event):
    data: EscrowEventData


class DepositEvent(_Event):
    data: DepositEventData


class PayoutEvent(_Event):
    data: PayoutEventData


class OtherEvent(_Event):
    """An event type this client has no class for; `data` as sent."""

    data: dict[str, Any]


Event = EscrowEvent | DepositEvent | PayoutEvent | OtherEvent
_BY_FAMILY: dict[str, type[Event]] = {
    "escrow": EscrowEvent,
    "deposit": DepositEvent,
    "payout": PayoutEvent,
}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    found = headers.get(name)
    if found is not None:
        return found
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


def parse_event(payload: bytes | str, event_id: str | None = None) -> Event:
    """The typed event of a webhook body, without checking its signature (for a body
    already verified, e.g. read back from your own queue)."""
    try:
        envelope = json.loads(payload)
        family = str(envelope["type"]).split(".", 1)[0]
    except (ValueError, KeyError, TypeError):
        raise WebhookPayloadInvalid("webhook body is not a JSON object with a type") from None
    model = _BY_FAMILY.get(family, OtherEvent)
    try:
        return model.model_validate({**envelope, "id": event_id})
    except ValidationError as exc:
        raise WebhookPayloadInvalid(
            f"webhook body is not a valid {envelope['type']} event: {exc.errors()[0]['msg']}"
        ) from None


def verify_webhook(
    payload: bytes, headers: Mapping[str, str], secret: str, *, tolerance_s: int = 300
) -> Event:
    """Check a delivery's signature with the endpoint's secret and return its event.

    Raises the subclasses of `escrowd.escrow.webhooks.WebhookVerificationFailed` (bad or
    missing signature, timestamp outside `tolerance_s`, which blocks replays) or
    WebhookPayloadInvalid; answer those with 400 and do nothing."""
    # The sender's own check, so one definition of the signature scheme: imported here
    # so that a client which never receives webhooks does not load the database layer.
    from escrowd.escrow.webhooks import SIGNATURE_HEADER
    from escrowd.escrow.webhooks import verify_webhook as verify_signature

    verify_signature(payload, _header(headers, SIGNATURE_HEADER), secret, tolerance_s)
    return parse_event(payload, _header(headers, EVENT_ID_HEADER))
