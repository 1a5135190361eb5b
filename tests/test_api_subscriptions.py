"""Subscriptions over HTTP: create (first charge now), reads, charges, pause and resume,
cancel, refusals that change nothing, idempotent replays and the OpenAPI description."""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import subscriptions
from escrowd.models import ApiScope, WebhookEvent, utcnow
from tests.escrow_fixtures import (
    available,
    credit,
    ledger_clean,
    make_client,
    make_key,
    platform_fees,
    seed_agents,
)
from tests.subscription_helpers import age

USDC = 1_000_000


def test_subscriptions_over_http(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    ids = seed_agents(sessions, "alice", "bob")
    with sessions() as s, s.begin():
        credit(s, ids["alice"], 25 * USDC)
    client = make_client(engine, tmp_path)
    auth = {"Authorization": f"Bearer {make_key(sessions, ApiScope.WRITE)}"}
    keys = itertools.count()

    def post(path: str, body: dict[str, Any] | None = None, key: str | None = None) -> Any:
        headers = {**auth, "Idempotency-Key": key or f"k-{next(keys)}"}
        return client.post(f"/v1{path}", json=body, headers=headers)

    def get(path: str, **params: Any) -> Any:
        return client.get(f"/v1{path}", params=params, headers=auth)

    plan = {"id": "sub-a", "buyer": "alice", "worker": "bob", "asset": "USDC",
            "amount": "10", "interval": "month", "fee_bps": 100}  # fmt: skip
    created = post("/subscriptions", plan, key="create-a")
    assert created.status_code == 201, created.text
    body = created.json()
    assert {k: body[k] for k in ("id", "status", "payee", "amount", "interval")} == {
        "id": "sub-a",
        "status": "active",
        "payee": "worker",
        "amount": "10",
        "interval": "month",
    }
    assert body["next_period_index"] == 1 and body["next_charge_at"] > body["starts_at"]
    # The first month is charged at once: 10 USDC, 0.1 of it the platform's.
    assert available(sessions, ids["alice"]) == 15 * USDC
    assert available(sessions, ids["bob"]) == 9_900_000
    replay = post("/subscriptions", plan, key="create-a")
    assert (replay.json(), replay.headers["Idempotent-Replayed"]) == (body, "true")
    assert available(sessions, ids["alice"]) == 15 * USDC
    assert get("/subscriptions/sub-a").json() == body
    [charge] = get("/subscriptions/sub-a/charges").json()["data"]
    assert (charge["period_index"], charge["status"], charge["payee_amount"]) == (
        0,
        "succeeded",
        "9.9",
    )
    assert (charge["fee_amount_base_units"], charge["attempts"]) == ("100000", 1)

    # Refusals: typed, and nothing is created or charged.
    cases = [
        ({**plan, "id": "sub-b", "amount": "16"}, 422, "insufficient_funds"),
        ({**plan, "id": "sub-a"}, 409, "subscription_conflict"),
        ({**plan, "id": "sub-b", "worker": None}, 400, "validation_error"),
        ({**plan, "id": "sub-b", "interval": "hour"}, 400, "validation_error"),
        ({**plan, "id": "sub-b", "amount": "1.0000001"}, 400, "invalid_amount"),
        ({**plan, "id": "sub-b", "worker": "nobody"}, 404, "agent_not_found"),
        (
            {**plan, "id": "sub-b", "starts_at": (utcnow() - timedelta(days=1)).isoformat()},
            400,
            "validation_error",
        ),
    ]
    for request, status, kind in cases:
        refused = post("/subscriptions", request)
        assert (refused.status_code, refused.json()["error"]["type"]) == (status, kind), request
    assert get("/subscriptions/sub-b").status_code == 404
    assert available(sessions, ids["alice"]) == 15 * USDC

    # The platform as payee, starting later: nothing charged yet.
    later = (utcnow() + timedelta(days=2)).isoformat()
    platform_plan = {"id": "sub-p", "buyer": "alice", "asset": "USDC", "amount": "2.5",
                     "interval": "week", "interval_count": 2, "starts_at": later}  # fmt: skip
    created_p = post("/subscriptions", platform_plan).json()
    assert (created_p["payee"], created_p["worker"], created_p["fee_bps"]) == ("platform", None, 0)
    assert get("/subscriptions/sub-p/charges").json()["data"] == []
    listed = get("/subscriptions", buyer="alice", limit=1).json()
    assert [row["id"] for row in listed["data"]] == ["sub-a"] and listed["next_cursor"]
    rest = get("/subscriptions", buyer="alice", cursor=listed["next_cursor"]).json()
    assert [row["id"] for row in rest["data"]] == ["sub-p"]
    assert get("/subscriptions", status="paused").json()["data"] == []

    # Two months later the second month is charged and the third finds 5 USDC: three
    # failed attempts pause the subscription; resume is refused until the buyer can pay.
    age(sessions, "sub-a", timedelta(days=62))
    policy = subscriptions.ChargePolicy(retry_after_s=60, max_charge_attempts=3)
    for attempt in range(3):
        subscriptions.charge_due(sessions, utcnow() + timedelta(minutes=attempt), policy)
    paused = get("/subscriptions/sub-a").json()
    assert (paused["status"], paused["next_charge_at"]) == ("paused", None)
    failed = get("/subscriptions/sub-a/charges", cursor=0).json()["data"]
    assert [(c["period_index"], c["status"], c["attempts"]) for c in failed] == [
        (1, "succeeded", 1),
        (2, "failed", 3),
    ]
    refused = post("/subscriptions/sub-a/resume")
    assert (refused.status_code, refused.json()["error"]["type"]) == (422, "insufficient_funds")
    assert get("/subscriptions/sub-a").json()["status"] == "paused"
    with sessions() as s, s.begin():
        credit(s, ids["alice"], 10 * USDC)
    resumed = post("/subscriptions/sub-a/resume")
    assert (resumed.status_code, resumed.json()["status"]) == (200, "active")
    assert available(sessions, ids["alice"]) == 5 * USDC

    canceled = post("/subscriptions/sub-a/cancel", {"requested_by": "buyer"})
    assert (canceled.json()["status"], canceled.json()["canceled_by"]) == ("canceled", "buyer")
    again = post("/subscriptions/sub-a/cancel")
    assert (again.status_code, again.json()["error"]["type"]) == (409, "subscription_conflict")
    assert post("/subscriptions/sub-p/cancel").json()["canceled_by"] == "marketplace"
    assert post("/subscriptions/sub-p/resume").status_code == 409
    assert post("/subscriptions/nope/cancel").status_code == 404
    assert platform_fees(sessions) == 300_000

    with sessions() as s:
        types = s.scalars(
            select(WebhookEvent.type)
            .where(WebhookEvent.type.like("subscription.%"))
            .order_by(WebhookEvent.id)
        ).all()
    assert types.count("subscription.charged") == 3
    assert types.count("subscription.charge_failed") == 3
    assert types[-2:] == ["subscription.canceled", "subscription.canceled"]
    schema = client.get("/openapi.json").json()
    assert {
        "/v1/subscriptions",
        "/v1/subscriptions/{subscription_id}",
        "/v1/subscriptions/{subscription_id}/charges",
        "/v1/subscriptions/{subscription_id}/cancel",
        "/v1/subscriptions/{subscription_id}/resume",
        "/v1/deposit-funded-escrows",
    } <= set(schema["paths"])
    assert ledger_clean(sessions)
