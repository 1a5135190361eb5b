"""The webhook outbox: events are written in the same transaction as the change they report.

Every event is ``{"type", "api_version", "data"}``; /openapi.json describes each type's
``data`` under ``webhooks`` (daemon/api_webhooks.py), with an example. Events name things by
the ids the HTTP API shows: agents by the marketplace's ids, escrows by job id, deposits
and payouts by the ids GET /v1/deposits and GET /v1/withdrawals show; networks by name.

API versions (the newest is API_VERSION):
- 2026-12-03: deposit.* and payout.* carry ``agent`` (the marketplace's id) instead of
  ``agent_id`` (an internal row id) and ``network`` instead of ``chain``; escrow.* no
  longer carry ``escrow_id`` (an internal row id; ``job_id`` names the escrow).
- 2026-11-01: first version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from escrowd.escrow.audit import canonical_json, json_string
from escrowd.models import WebhookEvent, bulk, utcnow

# Bumped only when a field is removed or changes meaning; adding fields keeps the version.
API_VERSION = "2026-12-03"
_API_VERSION_JSON = json_string(API_VERSION)

EVENT_TYPES = frozenset(
    {
        "deposit.pending",
        "deposit.confirmed",
        "deposit.orphaned",
        "deposit.unsupported",
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
        "payout.waiting_funds",
        "payout.needs_attention",
        "payout.retried",
        "payout.cancelled",
        "subscription.created",
        "subscription.charged",
        "subscription.charge_failed",
        "subscription.paused",
        "subscription.resumed",
        "subscription.canceled",
        "subscription.periods_skipped",
    }
)


def _payload(event_type: str, data: Mapping[str, Any] | str) -> str:
    """canonical_json of {"type", "api_version", "data"}; `data` as a str is its canonical
    JSON already. The keys sort as api_version, data, type."""
    data_json = data if isinstance(data, str) else canonical_json(data)
    return (
        f'{{"api_version":{_API_VERSION_JSON},"data":{data_json},"type":{json_string(event_type)}}}'
    )


def emit(session: Session, event_type: str, data: Mapping[str, Any] | str) -> WebhookEvent:
    assert event_type in EVENT_TYPES, f"unknown event type {event_type}"
    event = WebhookEvent(
        type=event_type, api_version=API_VERSION, payload=_payload(event_type, data)
    )
    session.add(event)
    session.flush()
    return event


def emit_many(session: Session, items: Sequence[tuple[str, Mapping[str, Any] | str]]) -> None:
    """Several events in a few set-based statements, ids in the given order; a str `data`
    is its canonical JSON already."""
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
