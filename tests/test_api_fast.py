"""The fast front (daemon/api_fast.py) answers its routes byte for byte as FastAPI does.

Two apps on one PostgreSQL database, one with the front and one without, get the same
requests (successes, every error the front itself answers, malformed input it hands to
FastAPI); status, body bytes and headers must match."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.daemon.api import create_app
from escrowd.daemon.api_fast import FastFront
from escrowd.escrow import service
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import AccountKind, ApiScope, Asset, Deposit, DepositAddress, PayoutReason
from escrowd.models.db import make_session_factory
from escrowd.models.escrow import OPEN_ESCROW_STATES
from tests.escrow_fixtures import make_key, make_settings, seed_agents

pytestmark = pytest.mark.postgres

# Headers that differ between two answers for reasons of time only.
VOLATILE_HEADERS = {"date"}


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
        assert [m.cls for m in fast.app.user_middleware] == [FastFront]  # type: ignore[attr-defined]
        assert plain.app.user_middleware == []  # type: ignore[attr-defined]
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


def test_balances_statement_spells_the_states_of_the_session_path() -> None:
    def listed(states: Iterable[str]) -> str:
        return ", ".join(f"'{state}'" for state in states)

    statement = service._PG_BALANCES
    assert f"e.status IN ({listed(OPEN_ESCROW_STATES)})" in statement
    assert f"p.status NOT IN ({listed(service.PAYOUT_FINAL_STATES)})" in statement
    assert f"p.reason <> '{PayoutReason.SWEEP}'" in statement
    assert f"la.kind = '{AccountKind.AGENT_AVAILABLE}'" in statement
