"""Receiving escrowd's webhooks: check the signatures, then read the event into a type.

    event = verify_webhook(await request.body(), request.headers, secret)
    if isinstance(event, EscrowEvent) and event.type == "escrow.released": ...

Every delivery is signed twice with the endpoint's secret: Standard Webhooks
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature``) and ``Escrowd-Signature``.
`verify_webhook` checks each one the delivery carries and needs at least one. Check the
raw body bytes exactly as received (parsing and re-encoding the JSON changes them).
Delivery is at least once: de-duplicate on `event.id`.

Each event type of the API version this client knows has a class: `DepositEvent`,
`UnsupportedDepositEvent`, `EscrowEvent`, `PayoutEvent`, `SubscriptionEvent`, each with
its types as a Literal. A type added by a newer server comes as `OtherEvent`.
"""

from __future__ import annotations

import binascii
import hmac
import json
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from escrowd.config.errors import ValidationFailed
from escrowd.escrow.values import EscrowState

EVENT_ID_HEADER = "Escrowd-Event-Id"
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"


class WebhookPayloadInvalid(ValidationFailed):
    """A webhook body that is not an escrowd event of its stated type."""

    type = "webhook_payload_invalid"


class _Model(BaseModel):
    # Fields added by a newer server (same api_version) are ignored, not refused.
    model_config = ConfigDict(frozen=True, extra="ignore")


class DepositEventData(_Model):
    """`agent`: the marketplace's id of the agent credited. `amount_base_units` is in the
    token's base units (`decimals`), `credited_base_units` in the asset's ledger units."""

    deposit_id: int
    agent: str
    network: str
    asset: str
    amount_base_units: int
    tx_hash: str
    log_index: int
    block_number: int
    status: str
    decimals: int | None = None
    # What happened to its credit (none, credited, dust, refused, reversed, reversal_short).
    credit_state: str = "none"
    credited_base_units: int = 0
    reversal_shortfall_base_units: int = 0
    dust_base_units: int = 0
    credit_note: str | None = None


class UnsupportedDepositEventData(_Model):
    """A token other than a supported asset reached `to_address` (an agent's deposit
    address); it is never credited. `amount_base_units` is in that token's base units."""

    unsupported_deposit_id: int
    agent: str
    network: str
    token_address: str
    amount_base_units: int
    tx_hash: str
    log_index: int
    block_number: int
    from_address: str
    to_address: str
    recovery_id: int | None = None


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


class PayoutEventData(_Model):
    """`payout_id` is the withdrawal's id in GET/POST /v1/withdrawals; `reason`:
    withdrawal, release or refund. The fields after `tx_hash` come with some types only:
    `reference` (requested), `block_number` (confirmed), `error` (failed), `status_reason`
    (waiting_funds, needs_attention, cancelled), `previous_status` (retried)."""

    payout_id: int
    agent: str | None = None
    network: str
    asset: str
    destination: str
    amount_base_units: int
    reason: str
    status: str
    tx_hash: str | None = None
    reference: str | None = None
    block_number: int | None = None
    error: str | None = None
    status_reason: str | None = None
    previous_status: str | None = None


class SubscriptionChargeData(_Model):
    period_index: int
    period_start: datetime
    status: Literal["succeeded", "failed"]
    attempts: int
    payee_amount_base_units: int | None = None
    fee_amount_base_units: int | None = None
    error: str | None = None


class SubscriptionEventData(_Model):
    """A subscription after the change reported. The fields after `next_charge_at` come
    with some types only: `anchor_at` (created: start of period 0), `charge` (charged,
    charge_failed, paused), `requested_by` (canceled), `skipped_from_period`,
    `skipped_to_period` and `reason` (periods_skipped: paused or catch_up_limit)."""

    subscription_id: str
    status: Literal["active", "paused", "canceled"]
    buyer: str
    worker: str | None = None
    payee: Literal["worker", "platform"]
    asset: str
    amount_base_units: int
    fee_bps: int
    interval: Literal["day", "week", "month"]
    interval_count: int
    next_period_index: int
    next_charge_at: datetime | None = None
    anchor_at: datetime | None = None
    charge: SubscriptionChargeData | None = None
    requested_by: Literal["buyer", "marketplace"] | None = None
    skipped_from_period: int | None = None
    skipped_to_period: int | None = None
    reason: str | None = None


class _Event(_Model):
    """`id`: the event's id (webhook-id, Escrowd-Event-Id), the key to de-duplicate
    deliveries on; None when parsed without headers."""

    id: str | None = None
    type: str
    api_version: str


class DepositEvent(_Event):
    type: Literal["deposit.pending", "deposit.confirmed", "deposit.orphaned"]
    data: DepositEventData


class UnsupportedDepositEvent(_Event):
    type: Literal["deposit.unsupported"]
    data: UnsupportedDepositEventData


class EscrowEvent(_Event):
    type: Literal[
        "escrow.funded", "escrow.released", "escrow.refunded", "escrow.resolved", "escrow.expired"
    ]
    data: EscrowEventData


class PayoutEvent(_Event):
    type: Literal[
        "payout.requested",
        "payout.signed",
        "payout.broadcast",
        "payout.confirmed",
        "payout.failed",
        "payout.waiting_funds",
        "payout.needs_attention",
        "payout.retried",
        "payout.cancelled",
    ]
    data: PayoutEventData


class SubscriptionEvent(_Event):
    type: Literal[
        "subscription.created",
        "subscription.charged",
        "subscription.charge_failed",
        "subscription.paused",
        "subscription.resumed",
        "subscription.canceled",
        "subscription.periods_skipped",
    ]
    data: SubscriptionEventData


class OtherEvent(_Event):
    """An event type this client has no class for; `data` as sent."""

    data: dict[str, Any]


Event = (
    DepositEvent
    | UnsupportedDepositEvent
    | EscrowEvent
    | PayoutEvent
    | SubscriptionEvent
    | OtherEvent
)
TYPED_EVENTS: tuple[type[Event], ...] = (
    DepositEvent,
    UnsupportedDepositEvent,
    EscrowEvent,
    PayoutEvent,
    SubscriptionEvent,
)
# Every event type this client reads into a class of its own.
EVENT_CLASSES: dict[str, type[Event]] = {
    event_type: cls
    for cls in TYPED_EVENTS
    for event_type in get_args(cls.model_fields["type"].annotation)
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
        event_type = str(envelope["type"])
    except (ValueError, KeyError, TypeError):
        raise WebhookPayloadInvalid("webhook body is not a JSON object with a type") from None
    model = EVENT_CLASSES.get(event_type, OtherEvent)
    try:
        return model.model_validate({**envelope, "id": event_id})
    except ValidationError as exc:
        raise WebhookPayloadInvalid(
            f"webhook body is not a valid {event_type} event: {exc.errors()[0]['msg']}"
        ) from None


def _verify_standard(
    payload: bytes, headers: Mapping[str, str], secret: str, tolerance_s: int
) -> str:
    """Check the Standard Webhooks signature; its webhook-id (signed with the body)."""
    from escrowd.escrow.webhooks import (
        SignatureHeaderInvalid,
        SignatureMismatch,
        standard_signature,
    )

    msg_id = _header(headers, STANDARD_ID_HEADER)
    stamp = _header(headers, STANDARD_TIMESTAMP_HEADER)
    signatures = _header(headers, STANDARD_SIGNATURE_HEADER) or ""
    if not msg_id or stamp is None:
        raise SignatureHeaderInvalid(
            f"{STANDARD_SIGNATURE_HEADER} needs the {STANDARD_ID_HEADER} and "
            f"{STANDARD_TIMESTAMP_HEADER} headers it signs"
        )
    if not stamp.isdigit():
        raise SignatureHeaderInvalid(f"{STANDARD_TIMESTAMP_HEADER} is not unix seconds")
    _check_time(int(stamp), tolerance_s)
    # Several space-separated "v1,<base64>" entries may come (a secret being rotated);
    # entries of other versions are not ours to check.
    candidates = [entry for entry in signatures.split() if entry.startswith("v1,")]
    if not candidates:
        raise SignatureHeaderInvalid(f"{STANDARD_SIGNATURE_HEADER} has no v1 signature")
    try:
        expected = standard_signature(payload, secret, msg_id, int(stamp))
    except (binascii.Error, ValueError):
        raise SignatureMismatch(
            "the secret is not whsec_ and base64: use the secret escrowd returned"
        ) from None
    matched = False
    for candidate in candidates:  # every one, so the time taken tells nothing
        matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    if not matched:
        raise SignatureMismatch(f"no {STANDARD_SIGNATURE_HEADER} matches the body and secret")
    return msg_id


def _check_time(stamp: int, tolerance_s: int) -> None:
    from escrowd.escrow.webhooks import TimestampOutOfTolerance

    skew_s = int(time.time()) - stamp
    if abs(skew_s) > tolerance_s:
        raise TimestampOutOfTolerance(
            f"signature timestamp is {skew_s} s from now, more than {tolerance_s} s: reject "
            "it (replayed or the clocks disagree)"
        )


def verify_webhook(
    payload: bytes, headers: Mapping[str, str], secret: str, *, tolerance_s: int = 300
) -> Event:
    """Check a delivery's signatures with the endpoint's secret and return its event.

    Checks the Standard Webhooks signature (``webhook-signature`` over webhook-id,
    webhook-timestamp and the body) and the ``Escrowd-Signature``, each that is present;
    one at least must be, and every one present must match. The event's `id` is the
    signed ``webhook-id`` when that signature is there, else ``Escrowd-Event-Id``.

    Raises the subclasses of `escrowd.escrow.webhooks.WebhookVerificationFailed` (bad or
    missing signature, timestamp outside `tolerance_s`, which blocks replays) or
    WebhookPayloadInvalid; answer those with 400 and do nothing."""
    # The sender's own definitions of the schemes: imported here so that a client which
    # never receives webhooks does not load the database layer.
    from escrowd.escrow.webhooks import SIGNATURE_HEADER, SignatureHeaderInvalid
    from escrowd.escrow.webhooks import verify_webhook as verify_escrowd_signature

    standard = _header(headers, STANDARD_SIGNATURE_HEADER) is not None
    escrowd_signature = _header(headers, SIGNATURE_HEADER)
    if not standard and escrowd_signature is None:
        raise SignatureHeaderInvalid(
            f"no signature: a delivery carries {STANDARD_SIGNATURE_HEADER} and {SIGNATURE_HEADER}"
        )
    event_id = _header(headers, EVENT_ID_HEADER)
    if standard:
        event_id = _verify_standard(payload, headers, secret, tolerance_s)
    if escrowd_signature is not None:
        verify_escrowd_signature(payload, escrowd_signature, secret, tolerance_s)
    return parse_event(payload, event_id)
