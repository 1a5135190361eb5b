"""One payout's trouble stays its own: an unexpected error parks that payout in
needs_attention (hold kept) while the others of the chain are paid in the same pass and
after a restart; `escrowd payouts retry|cancel` with their ledger and audit rows; cancel
refused while a signed transaction may still land (EVM: its nonce unused or mined;
Solana: blockhash valid) and allowed once it cannot; failing steps back off with one
alert."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from solders.keypair import Keypair
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from escrowd.daemon.cli import CliState
from escrowd.daemon.cli_payouts import payouts_app
from escrowd.escrow import accounts, ledger, payouts, service
from escrowd.escrow.payout_worker import (
    CrashHook,
    EvmPayoutChain,
    PayoutWorker,
    SimulatedCrash,
    SolanaPayoutChain,
    WorkerOptions,
)
from escrowd.indexer.evm_sender import EvmSender
from escrowd.indexer.evm_source import JsonRpcEvmSource, RetryPolicy
from escrowd.models import Payout, PayoutStatus, WebhookEvent
from escrowd.models.db import make_engine
from tests.escrow_fixtures import audit_actions
from tests.evm_fixtures import EvmChain, anvil_chain
from tests.log_capture import captured_logs
from tests.payout_fixtures import PASSPHRASE, EvmPayoutWorld, make_evm_world, random_address
from tests.test_payouts_solana import SolanaWorld
from tests.test_payouts_solana import world as solana_world

__all__ = ["anvil_chain", "solana_world"]

USDC = 10**6


@pytest.fixture
def world(
    anvil_chain: EvmChain, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EvmPayoutWorld]:
    monkeypatch.setenv("ESCROWD_KEYSTORE_PASSPHRASE", PASSPHRASE)
    engine: Engine = make_engine(sqlite_url)
    yield make_evm_world(anvil_chain, sqlite_url, engine, tmp_path)
    engine.dispose()


def _cli(config: Path) -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = CliState(config_path=config)

    app.add_typer(payouts_app, name="payouts")
    return app


def _status(world: EvmPayoutWorld | SolanaWorld, payout_id: int) -> Payout:
    with world.sessions() as s:
        return s.get_one(Payout, payout_id)


def _available(world: EvmPayoutWorld | SolanaWorld, agent_id: int, asset: str = "USDC") -> int:
    with world.sessions() as s:
        return ledger.balance(s, accounts.agent_available(s, agent_id, asset))


def _events(world: EvmPayoutWorld, payout_id: int) -> list[tuple[str, dict[str, object]]]:
    with world.sessions() as s:
        rows = s.scalars(select(WebhookEvent).order_by(WebhookEvent.id)).all()
    found = []
    for row in rows:
        data = json.loads(row.payload)["data"]
        if data.get("payout_id") == payout_id:
            found.append((row.type, data))
    return found


class GarbageOnFirstBroadcast(EvmSender):
    """A node whose first answer to eth_sendRawTransaction our client cannot handle."""

    broken = True

    def broadcast(self, raw_tx: bytes) -> str:
        if self.broken:
            self.broken = False
            raise ValueError("unexpected answer to eth_sendRawTransaction")
        return super().broadcast(raw_tx)


@pytest.mark.anvil
def test_a_poisoned_payout_is_parked_and_the_others_are_paid_in_the_same_pass(
    world: EvmPayoutWorld,
) -> None:
    destinations = [random_address() for _ in range(3)]
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent-ext-7")
        agent_id = agent.id
        world.credit(s, agent_id, 10 * USDC)
        ids = [
            world.request(s, agent_id, destination, USDC, f"iso-{i}").id
            for i, destination in enumerate(destinations)
        ]
        # A row an older version wrote with a destination this one cannot encode.
        s.get_one(Payout, ids[1]).destination = "0xnot-an-address"
    stats = world.worker().run_once()
    assert (stats.confirmed, stats.parked) == (2, 1)
    parked = _status(world, ids[1])
    assert parked.status == "needs_attention" and parked.attention_from == "requested"
    assert parked.status_reason is not None and "ValueError" in parked.status_reason
    assert parked.claimed_by is None
    assert world.chain.token.balance_of(destinations[0]) == USDC
    assert world.chain.token.balance_of(destinations[2]) == USDC
    # Its hold stays: 10 credited, 3 held or paid.
    assert _available(world, agent_id) == 7 * USDC

    # After a restart the parked payout is left alone and new ones are paid.
    later = random_address()
    with world.sessions() as s, s.begin():
        later_id = world.request(s, agent_id, later, 2 * USDC, "iso-later").id
    world.worker("restarted").run_until_idle()
    assert _status(world, later_id).status == "confirmed"
    assert _status(world, ids[1]).status == "needs_attention"

    runner, app = CliRunner(), _cli(world.config_path)
    listed = runner.invoke(app, ["payouts", "list", "--status", "needs_attention"])
    assert listed.output.startswith(f"{ids[1]}\tanvil\tUSDC\t{USDC}\tneeds_attention\t")
    assert "ValueError" in listed.output
    retried = runner.invoke(app, ["payouts", "retry", str(ids[1])])
    assert retried.exit_code == 0, retried.output
    assert _status(world, ids[1]).status == "requested"
    world.worker().run_once()  # still poisoned: parked again, nothing sent
    assert _status(world, ids[1]).status == "needs_attention"

    cancelled = runner.invoke(
        app, ["payouts", "cancel", str(ids[1]), "--reason", "destination corrupted"]
    )
    assert cancelled.exit_code == 0, cancelled.output
    payout = _status(world, ids[1])
    assert (payout.status, payout.status_reason) == ("cancelled", "destination corrupted")
    assert _available(world, agent_id) == 6 * USDC
    again = runner.invoke(app, ["payouts", "cancel", str(ids[1]), "--reason", "twice"])
    assert again.exit_code == 1 and "cancelled: settled" in again.output
    assert _available(world, agent_id) == 6 * USDC
    assert audit_actions(world.sessions, f"payout:{ids[1]}") == [
        "ledger_payout_hold",
        "payout_requested",
        "payout_needs_attention",
        "payout_retried",
        "payout_needs_attention",
        "ledger_payout_reversal",
        "payout_cancelled",
    ]
    events = _events(world, ids[1])
    assert [kind for kind, _ in events] == [
        "payout.requested",
        "payout.needs_attention",
        "payout.retried",
        "payout.needs_attention",
        "payout.cancelled",
    ]
    # The marketplace's id for the agent, never our internal one.
    assert {data["agent"] for _, data in events} == {"agent-ext-7"}
    assert all("agent_id" not in data for _, data in events)
    assert world.ledger_clean()
    assert world.reconcile_differences() == []


@pytest.mark.anvil
def test_a_signed_payout_cannot_be_cancelled_while_it_may_land(world: EvmPayoutWorld) -> None:
    first, second = random_address(), random_address()
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        agent_id = agent.id
        world.credit(s, agent_id, 5 * USDC)
        parked_id = world.request(s, agent_id, first, 2 * USDC, "signed-1").id
    flaky = PayoutWorker(
        world.sessions,
        EvmPayoutChain(
            GarbageOnFirstBroadcast(
                world.chain.source,
                world.keystore.evm_hot_wallet,
                chain="anvil",
                chain_id=31337,
                max_fee_gwei=200,
                confirmations=1,
            )
        ),
        WorkerOptions(worker_id="w1"),
    )
    flaky.run_once()
    parked = _status(world, parked_id)
    assert (parked.status, parked.attention_from) == ("needs_attention", "signed")
    runner, app = CliRunner(), _cli(world.config_path)
    refused = runner.invoke(app, ["payouts", "cancel", str(parked_id), "--reason", "stuck"])
    assert refused.exit_code == 1
    assert f"nonce {parked.nonce}" in refused.output and "may still be mined" in refused.output

    # A later payout takes the next nonce; its wallet's parked nonce is sent again from the
    # stored bytes so the later one can be mined.
    with world.sessions() as s, s.begin():
        later_id = world.request(s, agent_id, second, USDC, "signed-2").id
    world.worker().run_until_idle()
    assert _status(world, later_id).status == "confirmed"
    assert world.chain.token.balance_of(first) == 2 * USDC
    refused = runner.invoke(app, ["payouts", "cancel", str(parked_id), "--reason", "stuck"])
    assert refused.exit_code == 1 and "was mined in block" in refused.output
    assert _status(world, parked_id).status == "needs_attention"

    assert runner.invoke(app, ["payouts", "retry", str(parked_id)]).exit_code == 0
    world.worker().run_until_idle()
    assert _status(world, parked_id).status == "confirmed"
    assert world.transfers_from_hot() == {(first, 2 * USDC): 1, (second, USDC): 1}
    assert _available(world, agent_id) == 2 * USDC
    assert world.ledger_clean()
    assert world.reconcile_differences() == []


def test_solana_cancel_waits_for_blockhash_expiry_and_an_absent_signature(
    solana_world: SolanaWorld, sqlite_url: str, tmp_path: Path
) -> None:
    world = solana_world
    config = tmp_path / "solana.toml"
    config.write_text(
        f'database_url = "{sqlite_url}"\n'
        f'[solana]\nrpc_urls = ["{world.sim.url}"]\nusdc_mint = "{world.mint}"\n'
    )
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        agent_id = agent.id
        world.credit(s, agent_id, "USDC", 2 * USDC)
        payout_id = world.request(s, agent_id, "USDC", str(Keypair().pubkey()), 2 * USDC, "c-1")
    # Signed and stored; the worker dies before sending it, its lease still running.
    dying = PayoutWorker(
        world.sessions,
        SolanaPayoutChain(world.sender()),
        WorkerOptions(worker_id="dying", lease_s=0.5),
        crash=CrashHook("after_store", exit_process=False),
    )
    with pytest.raises(SimulatedCrash):
        dying.run_once()
    assert _status(world, payout_id).status == "signed"
    runner, app = CliRunner(), _cli(config)
    refused = runner.invoke(app, ["payouts", "cancel", str(payout_id), "--reason", "r"])
    assert refused.exit_code == 1 and "being worked on by dying" in refused.output
    time.sleep(0.5)
    refused = runner.invoke(app, ["payouts", "cancel", str(payout_id), "--reason", "r"])
    assert refused.exit_code == 1 and "may still land" in refused.output
    assert _status(world, payout_id).claimed_by is None
    world.sim.advance_slots(40)  # past the blockhash's validity, and finalized
    cancelled = runner.invoke(app, ["payouts", "cancel", str(payout_id), "--reason", "r"])
    assert cancelled.exit_code == 0, cancelled.output
    assert _status(world, payout_id).status == "cancelled"
    assert _available(world, agent_id) == 2 * USDC
    row = _status(world, payout_id)
    assert row.claimed_by is None
    assert "payout_cancelled" in audit_actions(world.sessions, f"payout:{payout_id}")
    # The worker never sends the cancelled payout's stored bytes.
    world.worker().run_until_idle()
    assert world.source.get_signature_statuses([row.tx_hash or ""])[0] is None
    assert world.clean()


def _dead_rpc_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.anvil
def test_a_failing_step_backs_off_and_alerts_once(world: EvmPayoutWorld) -> None:
    destination = random_address()
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, USDC)
        payout_id = world.request(s, agent.id, destination, USDC, "down-1").id
    dead = JsonRpcEvmSource(
        [_dead_rpc_url()],
        policy=RetryPolicy(timeout_s=0.5, attempts_per_url=1, backoff_base_s=0.01),
        chain="anvil",
    )
    backoff = payouts.Backoff(base_s=0.05, max_s=0.4, stalled_after_s=0.3)
    down = PayoutWorker(
        world.sessions,
        EvmPayoutChain(
            EvmSender(
                dead,
                world.keystore.evm_hot_wallet,
                chain="anvil",
                chain_id=31337,
                max_fee_gwei=200,
                confirmations=1,
            )
        ),
        WorkerOptions(worker_id="w1", backoff=backoff),
    )
    passes = 0
    with captured_logs() as logs:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            down.run_once()
            passes += 1
            time.sleep(0.01)
    failed = [e for e in logs if e["event"] == "payout_step_failed"]
    stalled = [e for e in logs if e["event"] == "payout_stalled"]
    assert len(stalled) == 1 and stalled[0]["log_level"] == "error"
    # Growing delays (0.05 s doubling to 0.4 s): at most 8 attempts in the 1.5 s, fewer
    # than the passes made (how many passes fit depends on the machine's load).
    attempts = len(failed) + len(stalled)
    assert 3 <= attempts <= 8 and attempts < passes
    payout = _status(world, payout_id)
    assert payout.status == "requested" and payout.step_errors == attempts
    assert payout.retry_at is not None and payout.stall_reported
    dead.close()

    with captured_logs() as logs:
        time.sleep(0.4)
        world.worker("w1").run_until_idle()
    assert [e["event"] for e in logs].count("payout_step_recovered") == 1
    payout = _status(world, payout_id)
    assert payout.status == "confirmed" and payout.step_errors == 0
    assert world.chain.token.balance_of(destination) == USDC
    assert world.ledger_clean()


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = payouts.Backoff(base_s=2.0, max_s=30.0)
    assert [backoff.delay_s(n) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.delay_s(500) == 30.0


def test_open_payouts_by_status_with_the_oldest_age(solana_world: SolanaWorld) -> None:
    world = solana_world
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, "SOL", 10**9)
        for i in range(3):
            world.request(s, agent.id, "SOL", str(Keypair().pubkey()), 10**8, f"age-{i}")
    time.sleep(0.2)
    with world.sessions() as s:
        rows = payouts.payouts_by_status(s)
    assert [(r.chain, r.status, r.count) for r in rows] == [("solana", "requested", 3)]
    assert 0.2 <= rows[0].oldest_age_s < 30
    world.worker().run_once()
    with world.sessions() as s:
        rows = payouts.payouts_by_status(s, [PayoutStatus.BROADCAST, PayoutStatus.REQUESTED])
    assert [(r.status, r.count) for r in rows] == [("broadcast", 3)]
