"""Crediting one deposit at a time (`LedgerDepositSink.confirmed`, through `ledger.post`)
and a whole confirmation pass at once (`confirmed_many`, set-based) write the same rows,
hashes and payloads, on SQLite and on PostgreSQL.

Two copies of one database get the same history (deposits on a 6- and an 18-decimal
chain, dust, an amount too large for the ledger, a deposit whose reversal fell short and
that came back, one fully reversed that came back) with the clock and the batch ids fixed;
then one credits the pending deposits one by one and the other in one call. Every table
must come out the same, except the columns the ORM stamps with the wall clock.
"""

from __future__ import annotations

import itertools
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import accounts, audit, ledger
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.sink import Finalized
from escrowd.indexer.store import FoundDeposit, Watched, record_deposit, record_deposits
from escrowd.models import (
    AccountKind,
    Agent,
    Chain,
    Deposit,
    DepositAddress,
    DepositStatus,
    TransferCode,
)
from escrowd.models.db import make_engine, make_session_factory
from escrowd.models.registry import ensure_asset
from tests.conftest import scratch_database

FROZEN = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)
AGENTS = 5
USDC_18 = 10**18


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def twin_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two fresh migrated databases of one kind."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        urls = []
        for name in ("one", "set"):
            shutil.copyfile(template, tmp_path / f"{name}.db")
            urls.append(f"sqlite:///{tmp_path / name}.db")
        yield urls[0], urls[1]
        return
    template_name: str = request.getfixturevalue("pg_template")
    with scratch_database(template_name) as one, scratch_database(template_name) as other:
        yield one, other


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """utcnow and uuid4 as the crediting code sees them: fixed, so hashes can compare."""
    for module in ("ledger", "audit", "deposits", "events"):
        monkeypatch.setattr(f"escrowd.escrow.{module}.utcnow", lambda: FROZEN)
    monkeypatch.setattr("escrowd.indexer.store.utcnow", lambda: FROZEN)
    yield


def _reset_uuids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch ids numbered in the order made, by either path (uuid4 one at a time, or the
    set-based path's ids drawn together)."""
    numbers = itertools.count(1)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=next(numbers)))
    monkeypatch.setattr(
        ledger, "_random_uuids", lambda count: [str(uuid.uuid4()) for _ in range(count)]
    )


def test_set_based_batch_ids_are_distinct_version_4_uuids() -> None:
    ids = ledger._random_uuids(20_000)
    assert len(set(ids)) == len(ids)
    for text_id in ids:
        parsed = uuid.UUID(text_id)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text_id)
    # Every digit but the version and variant bits is drawn: all 16 values appear.
    assert {text_id[0] for text_id in ids} == set("0123456789abcdef")
    assert {text_id[19] for text_id in ids} == set("89ab")


def _found(watched: Watched, asset_id: int, n: int, amount: int, block: int) -> FoundDeposit:
    return FoundDeposit(
        tx_hash=f"0x{n:064x}",
        log_index=n % 3,
        asset_id=asset_id,
        watched=watched,
        from_address="0x" + "ab" * 20,
        amount=amount,
        block_number=block,
        block_hash=f"0x{block:064x}",
    )


def _history(sessions: sessionmaker[Session], sink: LedgerDepositSink) -> None:
    """Everything up to the pending deposits both paths then credit."""
    with sessions() as s, s.begin():
        base = ensure_asset(
            s, chain="base", symbol="USDC", decimals=6, token_address="0x" + "01" * 20
        )
        bsc = ensure_asset(
            s, chain="bsc", symbol="USDC", decimals=18, token_address="0x" + "02" * 20
        )
        # A token finer still: its dust alone can pass BIGINT.
        wide = ensure_asset(
            s, chain="wide", symbol="USDC", decimals=36, token_address="0x" + "03" * 20
        )
        watched = []
        for i in range(AGENTS):
            agent = Agent(external_id=f"market-agent-{i}")
            s.add(agent)
            s.flush()
            address = DepositAddress(
                agent_id=agent.id, chain=Chain.EVM, address=f"0x{i + 1:040x}", derivation_index=i
            )
            s.add(address)
            s.flush()
            watched.append(Watched(address.id, agent.id, address.address, None))
            accounts.agent_available(s, agent.id, "USDC")
        for chain in ("base", "bsc", "wide"):
            accounts.custody(s, chain, "USDC")
        spent = ledger.get_or_create_account(s, AccountKind.GENERAL, "spent", "USDC")
        base_id, bsc_id, wide_id = base.id, bsc.id, wide.id
    # A deposit credited, mostly spent, orphaned by a deep reorg (its reversal falls short
    # by 3 USDC), then seen again at the same position in a new block.
    short = _found(watched[0], base_id, 1, 5_000_000, 10)
    # One credited, orphaned and fully reversed, then seen again.
    gone = _found(watched[1], bsc_id, 2, 2 * USDC_18, 10)
    with sessions() as s, s.begin():
        record_deposits(s, "base", [short], sink)
        record_deposits(s, "bsc", [gone], sink)
    with sessions() as s, s.begin():
        for deposit in s.scalars(select(Deposit).order_by(Deposit.id).with_for_update()):
            sink.confirmed(s, deposit)
        ledger.post(
            s,
            [
                ledger.TransferSpec(
                    "spend-1",
                    accounts.agent_available(s, watched[0].agent_id, "USDC").id,
                    spent.id,
                    3_000_000,
                    TransferCode.ADJUSTMENT,
                    "test",
                    "spend",
                )
            ],
            actor="test",
        )
    with sessions() as s, s.begin():
        for deposit in s.scalars(select(Deposit).order_by(Deposit.id).with_for_update()):
            sink.orphaned(s, deposit)
    with sessions() as s, s.begin():
        for item, chain in ((short, "base"), (gone, "bsc")):
            moved = FoundDeposit(
                **{**item.__dict__, "block_number": 12, "block_hash": "0x" + "12" * 32}
            )
            assert record_deposit(s, chain, moved, sink)
    with sessions() as s, s.begin():
        record_deposits(
            s,
            "base",
            [
                _found(watched[0], base_id, 10, 1_000_000, 20),
                _found(watched[1], base_id, 11, 7, 20),
                _found(watched[2], base_id, 12, 123_456_789, 21),
            ],
            sink,
        )
        record_deposits(
            s,
            "bsc",
            [
                _found(watched[2], bsc_id, 20, 10 * USDC_18, 30),  # 10 USDC, past BIGINT
                _found(watched[3], bsc_id, 21, USDC_18 + 1, 30),  # 1 base unit of dust
                _found(watched[4], bsc_id, 22, 10**11, 31),  # all of it dust
                _found(watched[3], bsc_id, 23, 2**255, 31),  # too large for the ledger
                _found(watched[4], bsc_id, 24, 3 * USDC_18 + 5 * 10**11, 32),
            ],
            sink,
        )
        record_deposits(
            s, "wide", [_found(watched[1], wide_id, 30, 2 * 10**36 + 10**29 + 7, 40)], sink
        )


def _pending(sessions: sessionmaker[Session]) -> list[Finalized]:
    with sessions() as s:
        return [
            Finalized(d.id, d.block_hash)
            for d in s.scalars(
                select(Deposit).where(Deposit.status == DepositStatus.PENDING).order_by(Deposit.id)
            )
        ]


def _dump(engine: Engine) -> dict[str, Any]:
    """Every table crediting writes, minus the columns the ORM stamps with the wall clock."""
    queries = {
        "deposits": "SELECT * FROM deposits ORDER BY id",
        "accounts": "SELECT * FROM ledger_accounts ORDER BY id",
        "transfers": "SELECT * FROM ledger_transfers ORDER BY id",
        "audit": "SELECT stream, seq, actor, action, asset, amount, details, created_at, "
        "prev_hash, row_hash FROM audit_log ORDER BY stream, seq",
        "heads": "SELECT * FROM audit_heads ORDER BY stream",
        "events": "SELECT id, type, api_version, payload FROM webhook_events ORDER BY id",
    }
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        for name, query in queries.items():
            result = conn.execute(text(query))
            rows = [dict(row._mapping) for row in result]
            for row in rows:
                row.pop("updated_at", None)
                if name == "deposits":
                    # SQLite keeps uint256 amounts as text, PostgreSQL as numeric.
                    row["amount"] = int(row["amount"])
                    row["dust_base_units"] = int(row["dust_base_units"])
            out[name] = rows
    return out


def _clean_dump(sessions: sessionmaker[Session], engine: Engine) -> dict[str, Any]:
    """The tables' rows once the ledger check and the audit chain pass; the engine is done."""
    with sessions() as s:
        assert ledger.check(s) == []
        report = audit.verify(s)
        assert report.ok, report.first_problem
    dump = _dump(engine)
    engine.dispose()
    return dump


def _assert_same_rows(first: dict[str, Any], second: dict[str, Any]) -> None:
    for table, rows in first.items():
        assert rows == second[table], f"{table} differs between the two paths"


def test_one_by_one_and_set_based_crediting_write_the_same_rows(
    twin_urls: tuple[str, str], fixed_clock: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    dumps = []
    for path, url in zip(("one", "set"), twin_urls, strict=True):
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        sink = LedgerDepositSink()
        _reset_uuids(monkeypatch)
        _history(sessions, sink)
        pending = _pending(sessions)
        assert len(pending) == 11
        with sessions() as s, s.begin():
            if path == "one":
                for final in pending:
                    deposit = s.get(Deposit, final.id, with_for_update=True)
                    assert deposit is not None
                    sink.confirmed(s, deposit)
            else:
                assert sink.confirmed_many(s, pending) == 11
        dumps.append(_clean_dump(sessions, engine))
    one, batch = dumps
    _assert_same_rows(one, batch)

    deposits = {row["tx_hash"][-2:]: row for row in one["deposits"]}
    # The 18-decimal 10 USDC deposit: stored whole, credited as 10 USDC at the ledger scale.
    assert deposits["14"]["amount"] == 10 * USDC_18
    assert (deposits["14"]["credit_state"], deposits["14"]["credited_base_units"]) == (
        "credited",
        10_000_000,
    )
    # 1 USDC and one base unit: 1 USDC credited, the unit held as dust with its reason.
    assert (deposits["15"]["credited_base_units"], deposits["15"]["dust_base_units"]) == (
        1_000_000,
        1,
    )
    assert "dust" in deposits["15"]["credit_note"]
    assert (deposits["16"]["credit_state"], deposits["16"]["credited_base_units"]) == ("dust", 0)
    # 2 USDC at 36 decimals, and dust past BIGINT: 10^29 + 7 token units.
    assert (deposits["1e"]["credited_base_units"], deposits["1e"]["dust_base_units"]) == (
        2_000_000,
        10**29 + 7,
    )
    assert deposits["17"]["credit_state"] == "refused"
    assert "largest ledger amount" in deposits["17"]["credit_note"]
    # Came back after a reversal 3 USDC short: 2 USDC credited again, 5 USDC stand once.
    assert (deposits["01"]["credit_state"], deposits["01"]["credited_base_units"]) == (
        "credited",
        5_000_000,
    )
    assert (deposits["02"]["credit_state"], deposits["02"]["credited_base_units"]) == (
        "credited",
        2_000_000,
    )
    keys = [
        t["idempotency_key"] for t in one["transfers"] if t["ref_id"] == str(deposits["01"]["id"])
    ]
    assert keys == [
        f"deposit:base:{deposits['01']['id']}",
        f"deposit-reversal:base:{deposits['01']['id']}:1",
        f"deposit:base:{deposits['01']['id']}:1",
    ]
    confirmed = [e for e in one["events"] if e["type"] == "deposit.confirmed"]
    assert '"agent":"market-agent-3"' in confirmed[-3]["payload"]
    assert f'"dust_base_units":"{10**29 + 7}"' in confirmed[-1]["payload"]
    assert '"agent_id"' not in "".join(e["payload"] for e in one["events"])


def test_a_dust_deposit_taken_by_a_reorg_holds_nothing_any_more(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    sink = LedgerDepositSink()
    with sessions() as s, s.begin():
        asset_id = ensure_asset(
            s, chain="bsc", symbol="USDC", decimals=18, token_address="0x" + "02" * 20
        ).id
        agent = Agent(external_id="dusty")
        s.add(agent)
        s.flush()
        address = DepositAddress(
            agent_id=agent.id, chain=Chain.EVM, address="0x" + "0d" * 20, derivation_index=0
        )
        s.add(address)
        s.flush()
        watched = Watched(address.id, agent.id, address.address, None)
        record_deposits(s, "bsc", [_found(watched, asset_id, 1, 10**11, 5)], sink)
    with sessions() as s, s.begin():
        assert sink.confirmed_many(s, _pending(sessions)) == 1
    with sessions() as s, s.begin():
        deposit = s.scalars(select(Deposit).with_for_update()).one()
        assert (deposit.credit_state, deposit.dust_base_units) == ("dust", 10**11)
        sink.orphaned(s, deposit)
    with sessions() as s:
        deposit = s.scalars(select(Deposit)).one()
        assert (deposit.status, deposit.credit_state, deposit.dust_base_units) == (
            "orphaned",
            "none",
            0,
        )
        assert ledger.check(s) == []
    engine.dispose()


def test_a_backfill_window_credits_final_deposits_as_a_later_pass_would(
    twin_urls: tuple[str, str], fixed_clock: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`escrowd backfill evm` credits deposits already at confirmation depth in the window
    that finds them (`final_hashes`); a window recorded pending and then confirmed by a
    pass writes the same rows, hashes and events. A deposit whose block the chain
    answers with another hash stays pending on both paths."""
    dumps = []
    for path, url in zip(("pass", "window"), twin_urls, strict=True):
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        sink = LedgerDepositSink()
        _reset_uuids(monkeypatch)
        with sessions() as s, s.begin():
            base_id = ensure_asset(
                s, chain="base", symbol="USDC", decimals=6, token_address="0x" + "01" * 20
            ).id
            bsc_id = ensure_asset(
                s, chain="bsc", symbol="USDC", decimals=18, token_address="0x" + "02" * 20
            ).id
            watched = []
            for i in range(AGENTS):
                agent = Agent(external_id=f"market-agent-{i}")
                s.add(agent)
                s.flush()
                address = DepositAddress(
                    agent_id=agent.id,
                    chain=Chain.EVM,
                    address=f"0x{i + 1:040x}",
                    derivation_index=i,
                )
                s.add(address)
                s.flush()
                watched.append(Watched(address.id, agent.id, address.address, None))
        windows = [
            (
                "base",
                [
                    _found(watched[0], base_id, 10, 1_000_000, 20),
                    _found(watched[0], base_id, 11, 7, 20),
                    _found(watched[2], base_id, 12, 123_456_789, 21),
                    # Its block is not the chain's any more: not credited.
                    _found(watched[3], base_id, 13, 5_000_000, 22),
                ],
                {20: f"0x{20:064x}", 21: f"0x{21:064x}", 22: "0x" + "ee" * 32},
            ),
            (
                "bsc",
                [
                    _found(watched[2], bsc_id, 20, 10 * USDC_18, 30),
                    _found(watched[3], bsc_id, 21, USDC_18 + 1, 30),
                    _found(watched[4], bsc_id, 22, 10**11, 31),
                    _found(watched[3], bsc_id, 23, 2**255, 31),
                ],
                {30: f"0x{30:064x}", 31: f"0x{31:064x}"},
            ),
        ]
        for chain, found, final_hashes in windows:
            with sessions() as s, s.begin():
                if path == "window":
                    assert record_deposits(s, chain, found, sink, final_hashes=final_hashes) == 4
                else:
                    assert record_deposits(s, chain, found, sink) == 4
            if path == "pass":
                with sessions() as s, s.begin():
                    final = [f for f in _pending(sessions) if f.block_hash in final_hashes.values()]
                    assert sink.confirmed_many(s, final) == len(final)
        dumps.append(_clean_dump(sessions, engine))
    by_pass, in_window = dumps
    _assert_same_rows(by_pass, in_window)
    states = {row["tx_hash"][-2:]: row["status"] for row in in_window["deposits"]}
    assert states["0d"] == "pending"
    assert [s for k, s in states.items() if k != "0d"] == ["confirmed"] * 7
    types = [e["type"] for e in in_window["events"]]
    assert types.count("deposit.pending") == 8 and types.count("deposit.confirmed") == 7
