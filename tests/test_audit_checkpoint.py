"""Audit checkpoints on PostgreSQL: anchored at a point where no writer is in flight, without
holding writers back while the heads are read, and never after a writer numbered its rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import Settings
from escrowd.daemon.jobs import JobContext, audit_checkpoint_jobs
from escrowd.escrow import audit, service
from escrowd.escrow.errors import CheckpointBusy
from escrowd.models import Agent
from escrowd.models.db import make_session_factory
from tests.escrow_fixtures import ledger_clean, seed_agents, waiting_for_a_lock
from tests.log_capture import captured_logs

pytestmark = pytest.mark.postgres


def _append(sessions: sessionmaker[Session], stream: str) -> None:
    with sessions() as s, s.begin():
        audit.append(s, stream=stream, actor="test", action="noted", details={})


def _audit_ids_taken(engine: Engine) -> int:
    with engine.connect() as connection:
        taken = connection.scalar(text("SELECT last_value FROM audit_log_id_seq"))
    return int(taken or 0)


def test_writers_append_while_a_checkpoint_reads_the_heads(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions = make_session_factory(pg_engine)
    for n in range(3):
        _append(sessions, f"escrow:before-{n}")
    appended: list[float] = []
    digest = audit._heads_digest

    def reading(heads: Iterator[tuple[str, int, str]]) -> tuple[str, int]:
        # A write of another stream, started while the heads are being read.
        writer = threading.Thread(
            target=lambda: (_append(sessions, "escrow:during"), appended.append(1))
        )
        writer.start()
        writer.join(timeout=5)
        return digest(heads)

    monkeypatch.setattr(audit, "_heads_digest", reading)
    started = time.monotonic()
    with sessions() as s, s.begin():
        audit.write_checkpoint(s, actor="test")
    assert appended == [1], "the write waited for the checkpoint"
    assert time.monotonic() - started < 5
    monkeypatch.undo()

    with sessions() as s:
        report = audit.verify(s)
        anchored = s.scalar(
            text("SELECT details FROM audit_log WHERE stream = 'checkpoint' ORDER BY seq DESC")
        )
    assert report.ok, report.problems
    # The write came after the point the checkpoint anchored: three streams, not four.
    assert '"streams":3' in str(anchored)


def test_a_fund_numbers_its_audit_rows_only_once_it_holds_the_heads_lock(
    pg_engine: Engine,
) -> None:
    """A checkpoint's point is where no writer holds audit_heads. A fund waiting for that
    lock must not have taken audit row ids yet: rows numbered below the checkpoint's
    highest id and committed after it make `audit verify` report the checkpoint broken."""
    sessions = make_session_factory(pg_engine)
    ids = seed_agents(sessions, "ann", "bob", balance=10_000)
    errors: list[BaseException] = []

    def fund() -> None:
        try:
            with sessions() as s:
                ann, bob = s.get_one(Agent, ids["ann"]), s.get_one(Agent, ids["bob"])
            service.fund_escrow_alone(
                pg_engine, job_id="j", buyer=ann, worker=bob, asset="USDC", amount=10, fee_bps=0
            )
        except BaseException as exc:
            errors.append(exc)

    with pg_engine.connect() as checkpoint:
        checkpoint.execute(text("LOCK TABLE audit_heads IN EXCLUSIVE MODE"))
        taken = _audit_ids_taken(pg_engine)
        funding = threading.Thread(target=fund)
        funding.start()
        assert waiting_for_a_lock(pg_engine)
        assert _audit_ids_taken(pg_engine) == taken
        checkpoint.rollback()
    funding.join(timeout=30)
    assert errors == []
    assert _audit_ids_taken(pg_engine) == taken + 2
    with sessions() as s, s.begin():
        audit.write_checkpoint(s, actor="test")
    assert ledger_clean(sessions)


def test_a_checkpoint_gives_up_rather_than_hold_writers_back(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that does not finish (here: the caller's own uncommitted append) fails the
    checkpoint after the lock timeout; writers queued behind it then go on."""
    sessions = make_session_factory(pg_engine)
    monkeypatch.setattr(audit, "CHECKPOINT_LOCK_TIMEOUT_MS", 200)
    with sessions() as s, s.begin():
        audit.append(s, stream="escrow:open", actor="test", action="noted", details={})
        started = time.monotonic()
        with pytest.raises(CheckpointBusy, match="did not finish within 200 ms"):
            audit.write_checkpoint(s, actor="test")
        assert time.monotonic() - started < 5
    _append(sessions, "escrow:after")
    with sessions() as s:
        assert audit.verify(s).ok
        checkpoints = s.scalar(text("SELECT count(*) FROM audit_log WHERE stream = 'checkpoint'"))
    assert checkpoints == 0


def test_the_daemons_checkpoint_job_defers_a_busy_checkpoint(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler's job meets a long writer as a warning and writes nothing; the next run
    anchors it."""
    sessions = make_session_factory(pg_engine)
    monkeypatch.setattr(audit, "CHECKPOINT_LOCK_TIMEOUT_MS", 200)
    ctx = JobContext(settings=Settings(), engine=pg_engine, sessions=sessions)
    [job] = audit_checkpoint_jobs(ctx)
    with sessions() as s, s.begin():
        audit.append(s, stream="escrow:long", actor="test", action="noted", details={})
        with captured_logs() as logs:
            assert job.run() is None
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "audit_checkpoint_deferred"
    ]
    job.run()
    with sessions() as s:
        assert audit.verify(s).ok
        anchored = s.scalar(text("SELECT details FROM audit_log WHERE stream = 'checkpoint'"))
    assert '"streams":1' in str(anchored)
