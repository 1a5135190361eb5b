"""The webhook outbox: events are written in the same transaction as the change they report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from escrowd.escrow.audit import canonical_json
from escrowd.models import WebhookEvent, bulk, utcnow

# Bumped only when a field is removed or changes meaning; adding fields keeps the version.
API_VERSION = "2026-11-01"

EVENT_TYPES = frozenset(
    {
        "deposit.pending",
        "deposit.confirmed",
        "deposit.orphaned",
        "escrow.funded",
        "escrow.released",
        "escrow.refunded",
        "escrow.resolved",
        "escrow.expired",
        "payout.requested",
        "payout.signed",
        "payout.broadcast",
        "payout.confirmed",
        "payout.failed",
        "subscription.created",
        "subscription.charged",
        "subscription.charge_failed",
        "subscription.paused",
        "subscription.resumed",
        "subscription.canceled",
        "subscription.periods_skipped",
    }
)


def _payload(event_type: str, data: Mapping[str, Any]) -> str:
    return canonical_json({"type": event_type, "api_version": API_VERSION, "data": data})


def emit(session: Session, event_type: str, data: Mapping[str, Any]) -> WebhookEvent:
    assert event_type in EVENT_TYPES, f"unknown event type {event_type}"
    event = WebhookEvent(
        type=event_type, api_version=API_VERSION, payload=_payload(event_type, data)
    )
    session.add(event)
    session.flush()
    return event


def emit_many(session: Session, items: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Several events in a few set-based statements, ids in the given order."""
    created_at = utcnow()
    rows = []
    for event_type, data in items:
        assert event_type in EVENT_TYPES, f"unknown event type {event_type}"
        rows.append(
            {
                "type": event_type,
                "api_version": API_VERSION,
                "payload": _payload(event_type, data),
                "fanned_out": False,
                "created_at": created_at,
            }
        )
    bulk.insert_rows(session, WebhookEvent.metadata.tables[WebhookEvent.__tablename__], rows)
