"""What PostgreSQL renders is byte for byte what Python renders: the fast front's fund and
release responses (migration 0017) as the API's response models write them, for every
escrow state, amounts at each scale and instants with and without microseconds; and
strings in audit details and event payloads as escrow/audit.canonical_json writes them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from escrowd.daemon.api import _escrow_out
from escrowd.daemon.api_schemas import EscrowOut
from escrowd.escrow import deposit_funding, service
from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.audit import canonical_json
from escrowd.escrow.money import format_amount
from escrowd.models import Escrow
from escrowd.models.db import make_session_factory
from tests.escrow_fixtures import CHAIN, seed_agents
from tests.test_deposit_funding import add_deposit, tx

pytestmark = pytest.mark.postgres

AMOUNTS = [0, 1, 9, 10, 100_000, 1_000_000, 1_500_000, 1_234_567, 10**12 + 1, 2**63 - 1]


@pytest.mark.parametrize("decimals", [0, 6, 9, 18])
def test_amounts_are_formatted_as_the_api_formats_them(pg_engine: Engine, decimals: int) -> None:
    with pg_engine.connect() as connection:
        for units in AMOUNTS:
            rendered = connection.scalar(
                text("SELECT escrowd_json_amount(:u, :d)"), {"u": units, "d": decimals}
            )
            assert rendered == f'"{format_amount(units, decimals)}"', (units, decimals)
        assert connection.scalar(text("SELECT escrowd_json_amount(NULL, 6)")) == "null"


STRINGS = [
    "",
    "plain ascii 0123 ~",
    'quote " and backslash \\ and slash /',
    "tab\t newline\n return\r bell\x07 escape\x1b del\x7f",
    "caf\u00e9 \u20ac \u4e2d\u6587",
    "astral \U0001f600 and \U00010000",
]


@pytest.mark.parametrize("value", STRINGS)
def test_strings_are_written_as_canonical_json_writes_them(pg_engine: Engine, value: str) -> None:
    with pg_engine.connect() as connection:
        rendered = connection.scalar(text("SELECT escrowd_json_text(:v)"), {"v": value})
    assert rendered == canonical_json(value)


def test_instants_are_written_as_pydantic_writes_them(pg_engine: Engine) -> None:
    instants = [
        datetime(2026, 12, 4, 17, 5, 6, tzinfo=UTC),
        datetime(2026, 12, 4, 17, 5, 6, 7, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 999_999, tzinfo=UTC),
        datetime(999, 1, 1, tzinfo=UTC),
    ]
    with pg_engine.connect() as connection:
        connection.execute(text("SET TIME ZONE 'America/New_York'"))
        for at in instants:
            model = EscrowOut.model_construct(created_at=at)
            expected = model.model_dump_json(include={"created_at"})
            rendered = connection.scalar(text("SELECT escrowd_json_time(:t)"), {"t": at})
            assert '{"created_at":' + rendered + "}" == expected


def test_escrows_in_every_state_render_as_the_api_renders_them(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    seed_agents(sessions, "ann", "bob", balance=100_000_000)
    expiry = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    with sessions() as s, s.begin():
        ann, bob = (service.get_agent(s, name) for name in ("ann", "bob"))
        for job, amount, fee_bps, expires in [
            ("plain", 1_500_000, 250, None),
            ("whole", 2_000_000, 0, expiry),
            ("odd", 1_234_567, 333, expiry + timedelta(microseconds=5)),
            ("refund", 10, 10_000, None),
            ("split", 9_999_999, 125, None),
        ]:
            service.fund_escrow(
                s,
                job_id=job,
                buyer=ann if job != "split" else bob,
                worker=bob if job != "split" else ann,
                asset="USDC",
                amount=amount,
                fee_bps=fee_bps,
                expires_at=expires,
            )
        service.release_escrow(s, "plain")
        service.refund_escrow(s, "refund")
        service.resolve_escrow(s, "split", 4_000_001)
    add_deposit(sessions, "ann", tx(7), 3_000_001)
    with sessions() as s, s.begin():
        deposit_funding.fund_escrow_from_deposit(
            s,
            job_id="deposit",
            deposit=deposit_funding.DepositRef(CHAIN, tx(7)),
            worker=service.get_agent(s, "bob"),
            fee_bps=250,
        )
        service.release_escrow(s, "deposit")
    with sessions() as s:
        escrows = list(s.query(Escrow).order_by(Escrow.id))
        assert [e.deposit_id is not None for e in escrows].count(True) == 1
        for escrow in escrows:
            expected = _escrow_out(s, escrow, AgentCache()).model_dump_json()
            rendered = s.scalar(
                text(
                    "SELECT escrowd_escrow_json(e, b.external_id, w.external_id, 6) "
                    "FROM escrows e JOIN agents b ON b.id = e.buyer_agent_id "
                    "JOIN agents w ON w.id = e.worker_agent_id WHERE e.job_id = :j"
                ),
                {"j": escrow.job_id},
            )
            assert rendered == expected, escrow.job_id
