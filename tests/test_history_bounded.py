"""Reads of live rows go through indexes of their own (migration 0020), on both databases:
the payouts of one wallet, pending deposits, open payouts and escrows, an agent's balances
and audit streams. Settled history is not in their path, however much of it there is."""

from __future__ import annotations

import re
import types
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.daemon.health import _StatusCounts
from escrowd.escrow import service, sweeps
from escrowd.indexer.solana_indexer import SolanaPoller
from escrowd.models import (
    Agent,
    ApiScope,
    Asset,
    AuditLog,
    Deposit,
    DepositAddress,
    Payout,
    utcnow,
)
from escrowd.models.registry import ensure_asset
from tests.escrow_fixtures import make_client, make_key, seed_agents
from tests.query_plans import explained, plan, statements


def _payout(asset: Asset, agent_id: int, key: str, **fields: object) -> Payout:
    values: dict[str, object] = {
        "chain": "solana",
        "reason": "withdrawal",
        "source_address": "hot",
        "destination": "dest",
        "amount": 5,
        "status": "confirmed",
    }
    values.update(fields)
    return Payout(idempotency_key=key, asset_id=asset.id, agent_id=agent_id, **values)


def _world(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Two agents with deposit addresses on Solana, settled and live deposits and payouts."""
    ids = seed_agents(sessions, "alice", "bob", balance=1_000)
    old = utcnow() - timedelta(hours=1)
    with sessions() as s, s.begin():
        asset = ensure_asset(s, chain="solana", symbol="USDC", decimals=6, token_address="mint")
        ids["asset"] = asset.id
        for n, name in enumerate(("alice", "bob")):
            address = DepositAddress(
                agent_id=ids[name], chain="solana", address=f"wallet-{name}", derivation_index=n
            )
            s.add(address)
            s.flush()
            for k, status in enumerate(("confirmed", "confirmed", "pending")):
                s.add(
                    Deposit(
                        chain="solana",
                        tx_hash=f"sig-{name}-{k}",
                        log_index=0,
                        asset_id=asset.id,
                        agent_id=ids[name],
                        deposit_address_id=address.id,
                        amount=1_000_000 * (k + 1),
                        block_number=k,
                        block_hash=f"b{k}",
                        status=status,
                    )
                )
        alice = ids["alice"]
        s.add_all(
            [
                _payout(asset, alice, "s1", reason="sweep", source_address="wallet-alice"),
                _payout(asset, alice, "s2", reason="sweep", source_address="wallet-alice"),
                _payout(asset, alice, "w1", created_at=old),
                _payout(asset, alice, "w2", status="cancelled", created_at=old),
                _payout(asset, alice, "w3", status="requested", amount=7),
                _payout(asset, alice, "w4", status="needs_attention", amount=11),
            ]
        )
        s.flush()
        s.execute(
            Payout.__table__.update()
            .where(Payout.idempotency_key == "s1")
            .values(updated_at=utcnow() - timedelta(minutes=5))
        )
    return ids


# A scan of a whole table (or of a whole index) in either database's plan.
WHOLE_SCAN = re.compile(r"Seq Scan|'SCAN (?!\(|CONSTANT)")


def _only_through(plans: list[str], *indexes: str) -> None:
    """Every plan reads its table through one of `indexes`, never by a scan of it."""
    for text in plans:
        assert any(index in text for index in indexes), text
        assert not WHOLE_SCAN.search(text), text


def test_last_outflow_of_each_wallet_is_read_from_the_end_of_its_index_run(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    _world(sessions)
    with sessions() as s:
        latest = s.scalars(select(Payout.updated_at).where(Payout.idempotency_key == "s2")).one()
    poller = types.SimpleNamespace(chain="solana")
    found: list[dict[str, object]] = []
    plans = explained(
        engine,
        sessions,
        "payouts",
        lambda s: found.append(
            SolanaPoller._last_outflows(poller, s, ["wallet-alice", "wallet-bob"])  # type: ignore[arg-type]
        ),
    )
    assert found == [{"wallet-alice": latest}]
    _only_through(plans, "ix_payouts_chain_source_address_updated_at")
    if engine.dialect.name == "postgresql":
        # max() per wallet as the last entry of its run, not an aggregate of the run.
        assert all("Backward" in text for text in plans), plans


def test_create_sweep_finds_the_earlier_sweeps_of_an_address_through_the_index(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    ids = _world(sessions)

    def sweep(s: Session) -> None:
        asset = s.get_one(Asset, ids["asset"])
        created = sweeps.create_sweep(
            s,
            chain="solana",
            asset=asset,
            source="wallet-bob",
            agent_id=ids["bob"],
            destination="hot",
            amount=3,
        )
        assert created

    _only_through(
        explained(engine, sessions, "payouts", sweep), "ix_payouts_chain_source_address_updated_at"
    )


def test_deposits_of_one_status_are_listed_through_the_status_index(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    _world(sessions)
    listed: list[list[str]] = []
    plans = explained(
        engine,
        sessions,
        "deposits",
        lambda s: listed.append(
            [d.tx_hash for d in service.list_deposits(s, status="pending", limit=10)]
        ),
    )
    assert listed == [["sig-alice-2", "sig-bob-2"]]
    _only_through(plans, "ix_deposits_status_id")


def test_balances_read_only_pending_deposits_and_open_payouts(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    ids = _world(sessions)
    found: list[list[service.AssetBalance]] = []

    def read(s: Session) -> None:
        found.append(service.balances(s, s.get_one(Agent, ids["alice"])))

    deposits = explained(engine, sessions, "deposits", read)
    payouts = explained(engine, sessions, "payouts", read)
    # 3 USDC pending; the requested and the parked payout hold 7 + 11, not the settled ones.
    assert [(b.asset, b.incoming, b.pending_withdrawals) for b in found[0]] == [
        ("USDC", 3_000_000, 18)
    ]
    _only_through(deposits, "ix_deposits_pending_by_agent")
    _only_through(payouts, "ix_payouts_held_by_agent")
    if engine.dialect.name != "postgresql":
        return
    with sessions() as s, s.begin():
        statement = plan(s, service.PG_BALANCES, ("alice",))
    assert "ix_deposits_pending_by_agent" in statement, statement
    assert "ix_payouts_held_by_agent" in statement, statement


def test_metrics_count_live_rows_through_indexes_and_settled_ones_rarely(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    ids = _world(sessions)
    with sessions() as s, s.begin():
        buyer, worker = s.get_one(Agent, ids["alice"]), s.get_one(Agent, ids["bob"])
        for job in ("j1", "j2"):
            service.fund_escrow(
                s, job_id=job, buyer=buyer, worker=worker, asset="USDC", amount=10, fee_bps=0
            )
        service.release_escrow(s, "j1")
    now = [0.0]
    counts = _StatusCounts(clock=lambda: now[0])
    counts.engine = engine

    def scrape() -> dict[str, dict[tuple[str, ...], float]]:
        return {
            family.name: {tuple(x.labels.values()): x.value for x in family.samples}
            for family in counts.collect()
        }

    first = scrape()
    assert first["escrowd_escrows"] == {("funded",): 1, ("released",): 1}
    assert first["escrowd_deposits"] == {("solana", "pending"): 2, ("solana", "confirmed"): 4}
    assert first["escrowd_payouts"] == {
        ("solana", "requested"): 1,
        ("solana", "needs_attention"): 1,
        ("solana", "confirmed"): 3,
        ("solana", "cancelled"): 1,
    }
    with sessions() as s, s.begin():
        service.release_escrow(s, "j2")
    # Open states are counted at each scrape; the settled history within its refresh.
    assert scrape()["escrowd_escrows"] == {("released",): 1}
    now[0] += counts.settled_max_age_s
    assert scrape()["escrowd_escrows"] == {("released",): 2}

    for table, indexes in (
        ("escrows", ("ix_escrows_open",)),
        ("deposits", ("ix_deposits_status_id", "ix_deposits_pending_by_agent")),
        ("payouts", ("ix_payouts_status_chain",)),
    ):
        _only_through(explained(engine, sessions, table, lambda _: scrape()), *indexes)


def test_an_agents_audit_rows_are_read_stream_by_stream(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    ids = seed_agents(sessions, "alice", "bob", "carol", balance=1_000)
    with sessions() as s, s.begin():
        alice, bob, carol = (s.get_one(Agent, ids[name]) for name in ("alice", "bob", "carol"))
        for n, (buyer, worker) in enumerate([(alice, bob), (bob, carol), (carol, alice)] * 3):
            service.fund_escrow(
                s, job_id=f"j{n}", buyer=buyer, worker=worker, asset="USDC", amount=5, fee_bps=0
            )
    client = make_client(engine, tmp_path)
    auth = {"Authorization": f"Bearer {make_key(sessions, ApiScope.READ)}"}
    pages: list[list[str]] = []
    cursor: int | None = None
    with statements(engine, "audit_log") as seen:
        while True:
            params: dict[str, str | int] = {"agent": "alice", "limit": 4}
            if cursor is not None:
                params["cursor"] = cursor
            body = client.get("/v1/audit", params=params, headers=auth).json()
            pages.append([row["stream"] for row in body["data"]])
            cursor = body["next_cursor"]
            if cursor is None:
                break
    with sessions() as s:
        expected = list(
            s.scalars(
                select(AuditLog.stream)
                .where(AuditLog.stream.in_([f"escrow:j{n}" for n in range(9) if n % 3 != 1]))
                .order_by(AuditLog.id)
            )
        )
    assert len(expected) >= 6
    assert [stream for page in pages for stream in page] == expected
    assert all(len(page) == 4 for page in pages[:-1])
    assert seen
    with sessions() as s, s.begin():
        for sql, params in seen:
            text = plan(s, sql, params)
            # SQLite names the unique constraint's index its own way.
            assert "uq_audit_log_stream_seq" in text or "autoindex_audit_log" in text, text
            assert "pk_audit_log" not in text, text
            assert "ix_escrows_buyer_agent_id_id" in text, text
            assert "ix_escrows_worker_agent_id_id" in text, text


def test_sweep_backoff_reads_only_the_sweeps_of_recently_failed_addresses(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    """Only an address with a sweep failed within the longest wait can still be waiting:
    its sweeps are read through the address index, the rest of the chain's are not."""
    ids = _world(sessions)
    now = utcnow()
    with sessions() as s, s.begin():
        asset = s.get_one(Asset, ids["asset"])
        bob = ids["bob"]
        s.add_all(
            [
                # wallet-alice's latest sweep failed, but longer ago than any wait.
                _payout(asset, ids["alice"], "fa", reason="sweep", source_address="wallet-alice"),
                _payout(asset, bob, "fb1", reason="sweep", source_address="wallet-bob"),
                _payout(asset, bob, "fb2", reason="sweep", source_address="wallet-bob"),
            ]
        )
        s.flush()
        for key, ago in (
            ("fa", timedelta(hours=7)),
            ("fb1", timedelta(hours=1)),
            ("fb2", timedelta()),
        ):
            s.execute(
                Payout.__table__.update()
                .where(Payout.idempotency_key == key)
                .values(status="failed", updated_at=now - ago)
            )
    found: list[dict[tuple[str, int], tuple[object, int]]] = []
    plans = explained(
        engine, sessions, "payouts", lambda s: found.append(sweeps._after_failures(s, "solana"))
    )
    [(key, (until, failures))] = found[0].items()
    assert key == ("wallet-bob", ids["asset"]) and failures == 2
    assert until == now + 2 * sweeps.SOLANA_SWEEP_RETRY
    _only_through(plans[:1], "ix_payouts_failed_sweeps")
    _only_through(plans[1:], "ix_payouts_chain_source_address_updated_at")
