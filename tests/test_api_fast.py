"""The fast front (daemon/api_fast.py) answers its routes byte for byte as FastAPI does.

Two apps on one PostgreSQL database, one with the front and one without, get the same
requests (successes, every error the front itself answers, malformed input it hands to
FastAPI); status, body bytes and headers must match."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.rate_limit import RateLimit
from escrowd.daemon.api import create_app
from escrowd.daemon.api_fast import FastFront
from escrowd.daemon.api_ratelimit import RateLimitHeaders
from escrowd.escrow import apikeys, service
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import (
    AccountKind,
    ApiKey,
    ApiScope,
    Asset,
    Deposit,
    DepositAddress,
    Escrow,
    IdempotencyKey,
    PayoutReason,
)
from escrowd.models.db import make_engine, make_session_factory
from tests.conftest import _admin, scratch_database
from tests.escrow_fixtures import ledger_clean, make_key, make_settings, seed_agents

pytestmark = pytest.mark.postgres

# Headers that differ between two answers for reasons of time only, or because the two
# apps count the same key's requests one after the other (RateLimit-Limit must match).
VOLATILE_HEADERS = {"date", "ratelimit-remaining", "ratelimit-reset"}


@pytest.fixture
def clients(pg_engine: Engine, tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    def client(fast: bool) -> TestClient:
        app = create_app(
            make_settings(tmp_path),
            pg_engine,
            webhook_cipher=SecretCipher(bytes(range(32))),
            fast_front=fast,
        )
        return TestClient(app, raise_server_exceptions=False)

    with client(True) as fast, client(False) as plain:
        outer = [RateLimitHeaders, FastFront]
        assert [m.cls for m in fast.app.user_middleware] == outer  # type: ignore[attr-defined]
        assert [m.cls for m in plain.app.user_middleware] == outer[:1]  # type: ignore[attr-defined]
        yield fast, plain


@pytest.fixture
def pg_sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(pg_engine)


def _same(
    fast: TestClient, plain: TestClient, method: str, path: str, headers: dict[str, str]
) -> int:
    answers = [
        client.request(method, path, headers=headers, follow_redirects=False)
        for client in (fast, plain)
    ]
    first, second = answers
    assert first.status_code == second.status_code, (path, first.text, second.text)
    assert first.content == second.content, path
    assert {k: v for k, v in first.headers.items() if k not in VOLATILE_HEADERS} == {
        k: v for k, v in second.headers.items() if k not in VOLATILE_HEADERS
    }, path
    return first.status_code


def test_balances_answers_match(
    clients: tuple[TestClient, TestClient], pg_sessions: sessionmaker[Session]
) -> None:
    fast, plain = clients
    ids = seed_agents(pg_sessions, "alice", "bob", "carol", balance=25_000_000)
    seed_agents(pg_sessions, "dave")
    read = make_key(pg_sessions, ApiScope.READ)
    with pg_sessions() as s, s.begin():
        # Alice has an open escrow and a pending deposit: every column of a balance row.
        alice, bob = service.get_agent(s, "alice"), service.get_agent(s, "bob")
        service.fund_escrow(
            s, job_id="j1", buyer=alice, worker=bob, asset="USDC", amount=1_500_000, fee_bps=100
        )
        address = DepositAddress(
            agent_id=ids["alice"], chain="evm", address="0x" + "cd" * 20, derivation_index=0
        )
        s.add(address)
        s.flush()
        usdc_id = s.scalars(select(Asset.id).where(Asset.symbol == "USDC")).one()
        s.add(
            Deposit(
                chain="base",
                tx_hash="0x" + "01" * 32,
                log_index=0,
                asset_id=usdc_id,
                agent_id=ids["alice"],
                deposit_address_id=address.id,
                amount=2_000_001,
                block_number=7,
                block_hash="0x" + "02" * 32,
            )
        )
    auth = {"Authorization": f"Bearer {read}"}
    statuses = [
        _same(fast, plain, "GET", f"/v1/agents/{agent}/balances", auth)
        for agent in ("alice", "bob", "carol", "dave", "nobody")
    ]
    assert statuses == [200, 200, 200, 200, 404]
    alice_row = fast.get("/v1/agents/alice/balances", headers=auth).json()["balances"][0]
    assert alice_row["escrowed_as_buyer"] == "1.5"
    assert alice_row["incoming"] == "2.000001"
    # Every way a key can be wrong, and paths the front hands to FastAPI.
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer esk_nothing"},
        {"Authorization": f"Bearer {read}x"},
        {"Authorization": f"bearer {read}"},
    ):
        assert _same(fast, plain, "GET", "/v1/agents/alice/balances", headers) in (200, 401)
    for path in (
        "/v1/agents/al%20ice/balances",
        "/v1/agents/" + "a" * 129 + "/balances",
        "/v1/agents/alice/balances/",
        "/v1/agents/alice/balances?x=1",
    ):
        _same(fast, plain, "GET", path, auth)
    assert _same(fast, plain, "POST", "/v1/agents/alice/balances", auth) == 405

    # The deposit page, with the parameters the front takes and ones it hands on.
    with pg_sessions() as s, s.begin():
        bob_address = DepositAddress(
            agent_id=ids["bob"], chain="evm", address="0x" + "ce" * 20, derivation_index=1
        )
        s.add(bob_address)
        s.flush()
        for n in range(2, 7):
            s.add(
                Deposit(
                    chain="solana" if n % 2 else "base",
                    tx_hash=f"0x{n:064x}",
                    log_index=n,
                    asset_id=usdc_id,
                    agent_id=ids["alice" if n < 5 else "bob"],
                    deposit_address_id=address.id if n < 5 else bob_address.id,
                    amount=10**30 + n,
                    block_number=7 + n,
                    block_hash="0x" + "02" * 32,
                    status="confirmed" if n == 3 else "pending",
                    credit_state="reversal_short" if n == 3 else "none",
                    credited_base_units=5 if n == 3 else 0,
                    credit_note="short" if n == 3 else None,
                )
            )
    for query in (
        "",
        "?limit=2",
        "?limit=2&cursor=2",
        "?cursor=3",
        "?agent=bob",
        "?agent=alice&limit=1&cursor=1",
        "?agent=nobody",
        "?limit=0",
        "?limit=201",
        "?limit=",
        "?limit=02",
        "?limit=1&limit=2",
        "?cursor=-1",
        "?agent=a%20b",
        "?status=pending",
        "?network=base",
        "?chain=base&agent=alice",
    ):
        _same(fast, plain, "GET", f"/v1/deposits{query}", auth)
    page = fast.get("/v1/deposits?limit=2", headers=auth).json()
    assert [row["id"] for row in page["data"]] == [1, 2] and page["next_cursor"] == 2
    assert _same(fast, plain, "GET", "/v1/deposits", {}) == 401


def test_balances_statement_spells_the_states_of_the_session_path() -> None:
    def listed(states: Iterable[str]) -> str:
        return ", ".join(f"'{state}'" for state in states)

    statement = service.PG_BALANCES
    # What open escrows hold is read from the buyer's account row (migration 0016).
    assert "escrows" not in statement
    assert f"p.status NOT IN ({listed(service.PAYOUT_FINAL_STATES)})" in statement
    assert f"p.reason <> '{PayoutReason.SWEEP}'" in statement
    assert f"la.kind = '{AccountKind.AGENT_AVAILABLE}'" in statement


# Instants in a body: the two databases record their own.
_INSTANT = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


@pytest.fixture
def twin_engine(pg_template: str) -> Iterator[Engine]:
    """A second database made like pg_url's, for the app without the front."""
    with scratch_database(pg_template) as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


def _seed_twins(engines: tuple[Engine, Engine]) -> dict[str, str]:
    """The same agents, balances and API keys (same secrets) in both databases."""
    keys: dict[str, str] = {}
    rows: list[ApiKey] = []
    for number, engine in enumerate(engines):
        sessions = make_session_factory(engine)
        seed_agents(sessions, "alice", "bob", balance=10_000_000)
        seed_agents(sessions, "poor", balance=1)
        with sessions() as s, s.begin():
            if number == 0:
                for scope in (ApiScope.WRITE, ApiScope.READ):
                    row, keys[scope.value] = apikeys.create_key(s, name=scope.value, scope=scope)
                    rows.append(row)
                    s.flush()
                    s.expunge(row)
            else:
                for row in rows:
                    s.add(
                        ApiKey(
                            name=row.name, prefix=row.prefix, key_hash=row.key_hash, scope=row.scope
                        )
                    )
    return keys


def test_fund_and_release_answers_match(
    pg_engine: Engine, twin_engine: Engine, tmp_path: Path
) -> None:
    keys = _seed_twins((pg_engine, twin_engine))
    fast, plain = (
        TestClient(
            create_app(
                make_settings(tmp_path),
                engine,
                webhook_cipher=SecretCipher(bytes(range(32))),
                fast_front=front,
            ),
            raise_server_exceptions=False,
        )
        for engine, front in ((pg_engine, True), (twin_engine, False))
    )
    write = {"Authorization": f"Bearer {keys['write']}"}
    read = {"Authorization": f"Bearer {keys['read']}"}

    def same(path: str, headers: dict[str, str], body: bytes | None = None) -> int:
        answers = [
            client.post(path, content=body, headers={"Content-Type": "application/json", **headers})
            for client in (fast, plain)
        ]
        first, second = answers
        assert first.status_code == second.status_code, (path, first.text, second.text)
        assert _INSTANT.sub(b"<t>", first.content) == _INSTANT.sub(b"<t>", second.content)
        volatile = {"date", "content-length", "ratelimit-reset"}
        assert {k: v for k, v in first.headers.items() if k not in volatile} == {
            k: v for k, v in second.headers.items() if k not in volatile
        }
        return first.status_code

    def fund(key: str, body: str, auth: dict[str, str] = write, **extra: str) -> int:
        headers = {**auth, "Idempotency-Key": key, **extra}
        return same("/v1/escrows", headers, body.encode())

    job = '{{"job_id": "{}", "buyer": "{}", "worker": "bob", "asset": "USDC", "amount": "{}"}}'
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    assert fund("k1", job.format("j1", "alice", "1.5")) == 201
    assert fund("k1", job.format("j1", "alice", "1.5")) == 201  # replayed
    assert fund("k1", job.format("j1", "alice", "2")) == 409  # key used for another body
    assert fund("k2", job.format("j1", "alice", "2")) == 409  # job already funded
    assert fund("k3", job.format("j3", "poor", "1")) == 422  # insufficient funds
    assert fund("k3", job.format("j3", "alice", "1")) == 201  # refusals store nothing
    with_fee = '{"job_id": "j4", "buyer": "alice", "worker": "bob", "asset": "USDC", '
    assert (
        fund("k4", with_fee + f'"amount": "0.25", "fee_bps": 250, "expires_at": "{later}"}}') == 201
    )
    # Handed to FastAPI: unknown agents and assets, bad amounts, malformed requests.
    assert fund("k5", job.format("j5", "nobody", "1")) == 404
    assert fund("k1", job.format("j1", "nobody", "1")) == 409  # the record decides first
    assert fund("k6", job.format("j6", "alice", "1.0000001")) == 400
    assert fund("k6", job.format("j6", "alice", "-1")) == 400
    assert fund("k6", job.replace("USDC", "XYZ").format("j6", "alice", "1")) in (400, 404)
    assert fund("k6", '{"job_id": "j6"') == 400
    assert fund("k6", "[]") == 400
    assert fund("k6", job.format("j6", "alice", "1"), **{"Content-Type": "text/plain"}) == 400
    assert fund("", job.format("j6", "alice", "1")) == 400
    assert fund("k 6", job.format("j6", "alice", "1")) == 400
    assert fund("k6", job.format("j/6", "alice", "1")) == 400
    # Keys: missing, wrong, read scope (checked before the body, as FastAPI does).
    assert fund("k7", job.format("j7", "alice", "1"), auth={}) == 401
    assert fund("k7", job.format("j7", "alice", "1"), auth=read) == 403
    assert fund("k7", "{", auth={}) == 400

    def release(job_id: str, key: str | None, auth: dict[str, str] = write) -> int:
        headers = {**auth, **({"Idempotency-Key": key} if key is not None else {})}
        return same(f"/v1/escrows/{job_id}/release", headers)

    assert release("j1", "r1") == 200
    assert release("j1", "r1") == 200  # replayed
    assert release("j1", "r2") == 409  # released already
    assert release("j3", "r1") == 409  # key used for another job
    assert release("nothing", "r3") == 404
    assert release("j3", None) == 400
    assert release("j%20x", "r4") == 400
    assert release("j3", "r5", auth=read) == 403
    assert release("j3", "r5", auth={}) == 401
    assert release("j4", "r6") == 200

    for engine in (pg_engine, twin_engine):
        sessions = make_session_factory(engine)
        with sessions() as s:
            states = {
                job: status for job, status in s.execute(select(Escrow.job_id, Escrow.status))
            }
        assert states == {"j1": "released", "j3": "funded", "j4": "released"}
        assert ledger_clean(sessions)


def test_the_front_counts_each_request_once_against_the_keys_rate_limit(
    clients: tuple[TestClient, TestClient], pg_sessions: sessionmaker[Session]
) -> None:
    fast, _ = clients
    seed_agents(pg_sessions, "alice", "bob", balance=5_000_000)
    with pg_sessions() as s, s.begin():
        _, key = apikeys.create_key(
            s, name="limited", scope=ApiScope.WRITE, rate_limit=RateLimit(requests=5, window_s=60)
        )
    # All requests in one window: wait for the next one if this one is nearly over.
    left = 60 - time.time() % 60
    if left < 15:
        time.sleep(left + 0.1)
    auth = {"Authorization": f"Bearer {key}"}

    def fund(job: str, buyer: str) -> Response:
        body = {"job_id": job, "buyer": buyer, "worker": "bob", "asset": "USDC", "amount": "1"}
        return fast.post("/v1/escrows", json=body, headers={**auth, "Idempotency-Key": job})

    answers = [
        fast.get("/v1/agents/alice/balances", headers=auth),
        fast.get("/v1/deposits?limit=10", headers=auth),
        fund("j1", "alice"),
        fund("j2", "nobody"),  # handed on to FastAPI: still one request
        fast.post("/v1/escrows/j1/release", headers={**auth, "Idempotency-Key": "r1"}),
        fast.get("/v1/agents/alice/balances", headers=auth),
        fund("j3", "alice"),
        fast.post("/v1/escrows/j1/release", headers={**auth, "Idempotency-Key": "r2"}),
    ]
    assert [a.status_code for a in answers] == [200, 200, 201, 404, 200, 429, 429, 429]
    assert [a.headers["RateLimit-Remaining"] for a in answers] == list("43210000")
    assert {a.headers["RateLimit-Limit"] for a in answers} == {"5"}
    for refused in answers[5:]:
        assert refused.json()["error"]["type"] == "rate_limited"
        assert refused.headers["Retry-After"] == refused.headers["RateLimit-Reset"]
    with pg_sessions() as s:
        assert s.scalars(select(Escrow.job_id)).all() == ["j1"]


def test_writes_from_a_processs_claimed_requests_check_the_key_in_the_escrow_call(
    clients: tuple[TestClient, TestClient], pg_sessions: sessionmaker[Session]
) -> None:
    # A high limit: after the first request the process hands out requests it claimed,
    # and fund and release read the key in the escrow call's own round trip.
    fast, _ = clients
    seed_agents(pg_sessions, "alice", "bob", balance=5_000_000)
    with pg_sessions() as s, s.begin():
        limit = RateLimit(requests=6400, window_s=3600)
        _, key = apikeys.create_key(s, name="w", scope=ApiScope.WRITE, rate_limit=limit)
        _, read_key = apikeys.create_key(s, name="r", scope=ApiScope.READ, rate_limit=limit)
    left = 3600 - time.time() % 3600
    if left < 30:
        time.sleep(left + 0.1)
    auth = {"Authorization": f"Bearer {key}"}
    reader = {"Authorization": f"Bearer {read_key}"}

    def fund(job: str, buyer: str, headers: dict[str, str] = auth) -> Response:
        body = {"job_id": job, "buyer": buyer, "worker": "bob", "asset": "USDC", "amount": "1"}
        return fast.post("/v1/escrows", json=body, headers={**headers, "Idempotency-Key": job})

    answers = [
        fast.get("/v1/agents/alice/balances", headers=auth),
        fund("j1", "alice"),
        fund("j2", "nobody"),  # handed on to FastAPI: counted once
        fast.post("/v1/escrows/j1/release", headers={**auth, "Idempotency-Key": "r1"}),
        fast.post("/v1/escrows/j1/release", headers=auth),  # no key: FastAPI's 400
        fund("j3", "alice"),
    ]
    assert [a.status_code for a in answers] == [200, 201, 404, 200, 400, 201]
    remaining = [int(a.headers["RateLimit-Remaining"]) for a in answers]
    assert remaining == list(range(6399, 6393, -1))

    fast.get("/v1/agents/alice/balances", headers=reader)
    refused = fund("j4", "alice", reader)
    assert (refused.status_code, refused.json()["error"]["type"]) == (403, "forbidden")
    with pg_sessions() as s, s.begin():
        apikeys.revoke_key(s, apikeys.parse(key)[0])
    assert fund("j5", "alice").status_code == 401
    revoked = fast.post("/v1/escrows/j3/release", headers={**auth, "Idempotency-Key": "r2"})
    assert revoked.status_code == 401
    with pg_sessions() as s:
        states = {job: status for job, status in s.execute(select(Escrow.job_id, Escrow.status))}
        assert states == {"j1": "released", "j3": "funded"}
        stored = s.scalars(select(IdempotencyKey.key).order_by(IdempotencyKey.key)).all()
        assert stored == ["j1", "j3", "r1"]
    assert ledger_clean(pg_sessions)


def test_connections_the_server_dropped_cost_no_request(
    clients: tuple[TestClient, TestClient], pg_engine: Engine, pg_sessions: sessionmaker[Session]
) -> None:
    # A PostgreSQL restart or a proxy's idle timeout drops the process's idle connections;
    # the next requests must not fail on them (fund goes to a pooled connection of its own).
    fast, _ = clients
    seed_agents(pg_sessions, "alice", "bob", balance=5_000_000)
    auth = {"Authorization": f"Bearer {make_key(pg_sessions, ApiScope.WRITE)}"}
    for _ in range(3):
        assert fast.get("/v1/agents/alice/balances", headers=auth).status_code == 200
    _admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{pg_engine.url.database}' AND pid <> pg_backend_pid()"
    )
    answers = [fast.get("/v1/agents/alice/balances", headers=auth) for _ in range(3)]
    body = {"job_id": "j1", "buyer": "alice", "worker": "bob", "asset": "USDC", "amount": "1"}
    answers.append(fast.post("/v1/escrows", json=body, headers={**auth, "Idempotency-Key": "k"}))
    assert [a.status_code for a in answers] == [200, 200, 200, 201]
