"""API keys (401/403, revocation, the CLI) and Idempotency-Key semantics."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from escrowd.escrow import apikeys
from escrowd.models import ApiKey, ApiScope, Escrow, IdempotencyKey
from escrowd.models.db import make_session_factory
from tests.escrow_fixtures import apikey_cli, available, make_client, make_key, seed_agents

ESCROW = {"job_id": "job-1", "buyer": "alice", "worker": "bob", "asset": "USDC", "amount": "1"}


def _headers(key: str, idem: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return headers


def test_missing_bad_revoked_and_wrong_scope_keys(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    client = make_client(engine, tmp_path)
    read, write = make_key(sessions, ApiScope.READ), make_key(sessions, ApiScope.WRITE)
    seed_agents(sessions, "alice")
    forged = read[: read.rindex("_") + 1] + "A" * 43
    unknown = "esk_000000000000_" + read[read.rindex("_") + 1 :]

    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        _headers(forged),
        _headers(unknown),
        _headers("esk_x_y"),
    ):
        response = client.get("/v1/agents/alice", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "unauthorized"
    assert client.get("/v1/agents/alice", headers=_headers(read)).status_code == 200

    create = client.post("/v1/agents", json={"id": "carol"}, headers=_headers(read, "k1"))
    assert create.status_code == 403
    assert "scope 'read'" in create.json()["error"]["message"]
    hooks = client.get("/v1/webhook-endpoints", headers=_headers(write))
    assert hooks.status_code == 403
    assert client.post("/v1/audit/verify", headers=_headers(write)).status_code == 403
    assert (
        client.post("/v1/agents", json={"id": "carol"}, headers=_headers(write, "k1")).status_code
        == 201
    )

    prefix = write.split("_")[1]
    with sessions() as s, s.begin():
        apikeys.revoke_key(s, prefix)
    revoked = client.get("/v1/agents/carol", headers=_headers(write))
    assert revoked.status_code == 401
    with sessions() as s:
        stored = s.scalars(select(ApiKey.key_hash).where(ApiKey.prefix == prefix)).one()
    assert write.split("_", 2)[2] not in stored  # only a hash of the secret is kept


def test_cli_creates_lists_and_revokes_keys(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    app = apikey_cli(engine)
    runner = CliRunner()
    created = runner.invoke(app, ["apikey", "create", "--name", "market", "--scope", "write"])
    assert created.exit_code == 0, created.output
    [key] = [line for line in created.stdout.splitlines() if line.startswith("esk_")]
    prefix = key.split("_")[1]
    listed = runner.invoke(app, ["apikey", "list"])
    assert prefix in listed.stdout and "active" in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout

    client = make_client(engine, tmp_path)
    assert (
        client.post("/v1/agents", json={"id": "a"}, headers=_headers(key, "1")).status_code == 201
    )
    assert runner.invoke(app, ["apikey", "revoke", prefix]).exit_code == 0
    assert "revoked" in runner.invoke(app, ["apikey", "list"]).stdout
    assert client.get("/v1/agents/a", headers=_headers(key)).status_code == 401
    missing = runner.invoke(app, ["apikey", "revoke", "000000000000"])
    assert missing.exit_code == 1
    bad_scope = runner.invoke(app, ["apikey", "create", "--name", "x", "--scope", "root"])
    assert bad_scope.exit_code == 2


def test_replay_restart_and_key_reuse(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    key = make_key(sessions, ApiScope.WRITE)
    ids = seed_agents(sessions, "alice", "bob", balance=5_000_000)
    client = make_client(engine, tmp_path)

    missing = client.post("/v1/escrows", json=ESCROW, headers=_headers(key))
    assert missing.status_code == 400
    first = client.post("/v1/escrows", json=ESCROW, headers=_headers(key, "fund-1"))
    assert first.status_code == 201
    again = client.post(
        "/v1/escrows", json=dict(reversed(ESCROW.items())), headers=_headers(key, "fund-1")
    )
    assert (again.status_code, again.json()) == (201, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"

    restarted = make_client(engine, tmp_path)  # a new app on the same database
    replay = restarted.post("/v1/escrows", json=ESCROW, headers=_headers(key, "fund-1"))
    assert (replay.status_code, replay.json()) == (201, first.json())
    assert available(sessions, ids["alice"]) == 4_000_000  # funded once

    other = restarted.post(
        "/v1/escrows", json={**ESCROW, "amount": "2"}, headers=_headers(key, "fund-1")
    )
    assert other.status_code == 409
    assert other.json()["error"]["type"] == "idempotency_conflict"
    elsewhere = restarted.post("/v1/escrows/job-1/refund", headers=_headers(key, "fund-1"))
    assert elsewhere.status_code == 409

    release = restarted.post("/v1/escrows/job-1/release", headers=_headers(key, "rel-1"))
    assert release.status_code == 200
    assert client.post("/v1/escrows/job-1/release", headers=_headers(key, "rel-1")).json() == (
        release.json()
    )
    # Another principal's keys are its own namespace: the same key runs a new request.
    other_key = make_key(sessions, ApiScope.WRITE)
    repeat = client.post("/v1/escrows/job-1/release", headers=_headers(other_key, "rel-1"))
    assert repeat.status_code == 409
    assert repeat.json()["error"]["type"] == "escrow_conflict"
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Escrow)) == 1


def test_webhook_secret_is_returned_once_and_not_stored(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    admin = make_key(sessions, ApiScope.ADMIN)
    client = make_client(engine, tmp_path)
    body = {"url": "https://hooks.example.com/escrowd", "event_types": ["escrow.released"]}
    created = client.post("/v1/webhook-endpoints", json=body, headers=_headers(admin, "wh-1"))
    assert created.status_code == 201
    secret = created.json()["secret"]
    assert secret.startswith("whsec_")
    replay = client.post("/v1/webhook-endpoints", json=body, headers=_headers(admin, "wh-1"))
    assert replay.json() == {**created.json(), "secret": None}
    with sessions() as s:
        stored = s.scalars(select(IdempotencyKey.response_body)).all()
    assert all(secret not in text for text in stored)
    listed = client.get("/v1/webhook-endpoints", headers=_headers(admin)).json()
    assert [e["url"] for e in listed] == [body["url"]]
    endpoint_id = created.json()["id"]
    rotated = client.post(
        f"/v1/webhook-endpoints/{endpoint_id}/rotate-secret", headers=_headers(admin, "rot-1")
    ).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != secret
    deliveries = client.get("/v1/webhook-deliveries", headers=_headers(admin)).json()
    assert deliveries == {"data": [], "next_cursor": None}
    missing = client.post("/v1/webhook-deliveries/99/redeliver", headers=_headers(admin, "rd"))
    assert missing.status_code == 404
    deleted = client.delete(f"/v1/webhook-endpoints/{endpoint_id}", headers=_headers(admin))
    assert deleted.status_code == 200
    assert client.get("/v1/webhook-endpoints", headers=_headers(admin)).json() == []


@pytest.mark.postgres
def test_concurrent_requests_with_one_key_run_once(pg_engine: Engine, tmp_path: Path) -> None:
    sessions = make_session_factory(pg_engine)
    key = make_key(sessions, ApiScope.WRITE)
    ids = seed_agents(sessions, "alice", "bob", balance=5_000_000)
    client = make_client(pg_engine, tmp_path)
    barrier = threading.Barrier(8)
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def send() -> None:
        barrier.wait()
        response = client.post("/v1/escrows", json=ESCROW, headers=_headers(key, "same"))
        with lock:
            results.append((response.status_code, response.text))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [status for status, _ in results] == [201] * 8
    assert len({text for _, text in results}) == 1
    assert available(sessions, ids["alice"]) == 4_000_000
