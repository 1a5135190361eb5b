"""`escrowd reconcile`: on-chain custody against the ledger, each chain at one block,
deposits seen but not credited listed apart, unreadable chains reported, exit 1 only on a
real difference; `escrowd wallets`: balances, needs, warnings, and booking float."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tomli_w
from prometheus_client import REGISTRY
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner
from web3.types import Wei

from escrowd.config.settings import (
    EvmChainSettings,
    KeystoreSettings,
    PayoutSettings,
    ReconcileSettings,
    Settings,
    load_settings,
)
from escrowd.daemon.cli import app
from escrowd.daemon.jobs import JobContext, reconcile_jobs
from escrowd.devnet.anvil import free_port
from escrowd.devnet.evm import mine_blocks
from escrowd.escrow import accounts, ledger, reconcile, service, sweeps
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.escrow.payouts import PlatformAddresses, request_payout
from escrowd.escrow.reconcile import HotWallets, Line, Report, reconcile_configured
from escrowd.indexer.evm_poller import EvmPoller
from escrowd.indexer.evm_source import JsonRpcEvmSource, RetryPolicy
from escrowd.models import Deposit, Payout, PayoutReason, TransferCode
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.allocation import allocate_deposit_address
from escrowd.wallets.keystore import UnlockedKeystore, create_keystore
from escrowd.wallets.secrets import Secret
from tests.evm_fixtures import EvmChain
from tests.log_capture import captured_logs

PASSPHRASE = "reconcile-test-passphrase"
CHAIN = "base"


@pytest.mark.parametrize(
    ("on_chain", "held", "in_flight", "difference"),
    [
        (100, 100, 0, 0),
        (100, 100, 30, 0),  # hold placed, transfer not sent yet
        (70, 100, 30, 0),  # transfer mined, not yet settled in the ledger
        (60, 100, 30, -10),  # missing beyond what is in flight
        (105, 100, 30, 5),  # coins the ledger does not know about
        (0, 0, 0, 0),
    ],
)
def test_difference_allows_only_what_is_in_flight(
    on_chain: int, held: int, in_flight: int, difference: int
) -> None:
    line = Line("c", "USDC", on_chain=on_chain, held_by_ledger=held, in_flight=in_flight)
    assert line.difference == difference


def test_what_is_under_way_is_explained_not_a_difference() -> None:
    base = Line("c", "USDC", on_chain=130, held_by_ledger=100, in_flight=0)
    assert base.difference == 30
    assert Line("c", "USDC", 130, 100, 0, uncredited=30).difference == 0
    # A payout settled in the ledger but mined after the block read is still on chain.
    assert Line("c", "USDC", 130, 80, 0, uncredited=30, settled_after_pin=20).difference == 0
    # A deposit credited, mined after the block read, is not on chain there yet.
    assert Line("c", "USDC", 100, 110, 0, credited_after_pin=10).difference == 0
    # Solana: what landed inside the read's slots may or may not be in it.
    assert Line("c", "SOL", 100, 100, 0, may_have_arrived=5).difference == 0
    assert Line("c", "SOL", 105, 100, 0, may_have_arrived=5).difference == 0
    assert Line("c", "SOL", 106, 100, 0, may_have_arrived=5).difference == 1
    assert Line("c", "SOL", 97, 100, 0, may_have_left=3).difference == 0
    assert Line("c", "SOL", 96, 100, 0, may_have_left=3).difference == -1


@dataclass
class World:
    chain: EvmChain
    settings: Settings
    config_path: Path
    engine: Engine
    sessions: sessionmaker[Session]
    keystore: UnlockedKeystore
    poller: EvmPoller

    @property
    def hot(self) -> str:
        return self.keystore.evm_hot_wallet.address

    def hot_wallets(self) -> HotWallets:
        return HotWallets(evm=self.hot, solana=self.keystore.solana_hot_wallet.address)

    def deposit_address(self, agent: str) -> str:
        with self.sessions() as s, s.begin():
            agent_id = service.register_agent(s, agent).id
            row = allocate_deposit_address(s, agent_id, "evm", self.keystore.evm_deriver())
            return row.address

    def poll(self) -> None:
        self.poller.poll_once()
        self.poller.confirm_once()

    def reconcile(self, source: JsonRpcEvmSource | None = None) -> Report:
        return reconcile_configured(
            self.sessions,
            self.settings,
            self.hot_wallets(),
            evm_sources={CHAIN: source} if source is not None else None,
        )

    def cli(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["--config", str(self.config_path), *args])
        return result.exit_code, result.output


def _settings(tmp_path: Path, db_url: str, chains: list[EvmChainSettings]) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=db_url,
        keystore=KeystoreSettings(path=tmp_path / "keystore.json"),
        payouts=PayoutSettings(min_usdc_base_units=1),
        evm_chains=chains,
    )


def _write(settings: Settings, path: Path) -> Path:
    path.write_text(tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True)))
    return path


def base_chain(chain: EvmChain, **overrides: object) -> EvmChainSettings:
    assert chain.url is not None
    values: dict[str, object] = {
        "name": CHAIN,
        "chain_id": 31337,
        "rpc_urls": [chain.url],
        "usdc_address": chain.token.address,
        "confirmations": 2,
        "rpc_max_retries": 0,
        "rpc_timeout_s": 5.0,
    }
    values.update(overrides)
    return EvmChainSettings.model_validate(values)


@pytest.fixture
def world(
    anvil_chain: EvmChain, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    monkeypatch.setenv("ESCROWD_KEYSTORE_PASSPHRASE", PASSPHRASE)
    keystore = create_keystore(tmp_path / "keystore.json", Secret(PASSPHRASE), scrypt_log2_n=10)
    settings = _settings(tmp_path, sqlite_url, [base_chain(anvil_chain)])
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    anvil_chain.w3.eth.send_transaction(
        {
            "from": anvil_chain.accounts[0],
            "to": keystore.evm_hot_wallet.address,
            "value": Wei(10**19),
        }
    )
    poller = EvmPoller(settings.evm_chains[0], anvil_chain.source, sessions, LedgerDepositSink())
    yield World(
        anvil_chain,
        settings,
        _write(settings, tmp_path / "escrowd.toml"),
        engine,
        sessions,
        keystore,
        poller,
    )
    engine.dispose()


class ChainMovesOn(httpx.BaseTransport):
    """Passes requests to the node; just before the first balance read, runs `move`
    (mines the sweep in the mempool and a new deposit), as a live chain would."""

    def __init__(self, move: Callable[[], None]) -> None:
        self.inner = httpx.HTTPTransport()
        self.move: Callable[[], None] | None = move

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        calls = json.loads(request.content)
        if self.move is not None and any(call["method"] == "eth_call" for call in calls):
            move, self.move = self.move, None
            move()
        return self.inner.handle_request(request)


def _rpc(world: World, method: str, *params: object) -> None:
    world.chain.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]


@pytest.mark.anvil
def test_a_sweep_in_the_mempool_and_a_deposit_short_of_confirmation_are_no_difference(
    world: World,
) -> None:
    chain, token, payer = world.chain, world.chain.token, world.chain.accounts[1]
    address = world.deposit_address("buyer")
    token.transfer(payer, address, 5_000_000)
    world.poll()
    mine_blocks(chain.w3, 2)
    world.poll()
    # The gas wallet funds the sweep's gas (mined), then the sweep waits in the mempool.
    chain.w3.eth.send_transaction(
        {
            "from": chain.accounts[0],
            "to": world.keystore.evm_gas_wallet.address,
            "value": Wei(10**18),
        }
    )
    sweeper = sweeps.build_evm_sweeper(
        world.sessions, world.settings, CHAIN, world.keystore, chain.source
    )
    assert sweeper.run_once().funded == 1
    token.transfer(payer, address, 3_000_000)
    mine_blocks(chain.w3, 1)
    world.poll()
    _rpc(world, "evm_setAutomine", False)
    assert sweeper.run_once().sent == 1
    with world.sessions() as s:
        pending = s.query(Deposit).filter(Deposit.credited.is_(False)).one()
        assert chain.source.head() - pending.block_number == 1  # one block short

    def move() -> None:
        token.transfer(payer, address, 1_000_000, wait=False)  # not seen by the poller yet
        mine_blocks(chain.w3, 1)

    assert chain.url is not None
    policy = RetryPolicy(timeout_s=5.0, attempts_per_url=1)
    with JsonRpcEvmSource(
        [chain.url], policy=policy, chain=CHAIN, transport=ChainMovesOn(move)
    ) as racing:
        report = world.reconcile(racing)
    # The sweep (of the 5 USDC there when it was created) was mined during the read.
    assert token.balance_of(address) == 4_000_000
    assert report.differences == []
    [base] = report.chains
    [usdc] = base.lines
    # The pin is the poller's verified cursor, `confirmations` blocks below the head: the
    # deposit one block short of its depth lies above it, so the read does not see it yet
    # and it is no difference either way.
    pin = int(base.at.split()[1])
    assert pin < pending.block_number
    assert (usdc.on_chain, usdc.held_by_ledger, usdc.uncredited) == (5_000_000, 5_000_000, 0)
    assert base.uncredited == []
    assert base.open_sweeps == 1

    # The chain moved on; once polled, swept and confirmed it still reconciles.
    _rpc(world, "evm_setAutomine", True)
    for _ in range(6):
        mine_blocks(chain.w3, 2)
        world.poll()
        sweeper.run_once()
    with world.sessions() as s:
        assert {p.status for p in s.query(Payout)} == {"confirmed"}
    code, output = world.cli("reconcile")
    assert code == 0, output
    assert f"{CHAIN} (evm) at block " in output
    assert "USDC: on chain 9000000, ledger holds 9000000, in flight 0: ok" in output
    assert "seen, not yet credited" not in output


@pytest.mark.anvil
def test_a_real_difference_exits_1_and_booked_float_is_expected(world: World) -> None:
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "worker")
    world.chain.token.mint(world.hot, 123_000_000)
    code, output = world.cli("reconcile")
    assert code == 1
    assert f"DIFFERENCE {CHAIN} USDC: on chain 123000000, ledger holds 0" in output
    assert "off by 123000000" in output

    code, output = world.cli(
        "wallets", "book-funding", "--chain", CHAIN, "--asset", "USDC", "--amount", "123",
        "--reference", "float-1",
    )  # fmt: skip
    assert code == 0, output
    assert "booked: funding of 123 USDC on base; operator float now 123 USDC" in output
    # The same reference again changes nothing.
    code, output = world.cli(
        "wallets", "book-funding", "--chain", CHAIN, "--asset", "USDC", "--amount", "123",
        "--reference", "float-1",
    )  # fmt: skip
    assert "already booked" in output and "float now 123 USDC" in output
    assert world.cli("reconcile")[0] == 0

    # A withdrawal beyond the booked float is refused and changes nothing.
    code, output = world.cli(
        "wallets", "book-withdrawal", "--chain", CHAIN, "--asset", "USDC", "--amount", "124",
        "--reference", "back-1",
    )  # fmt: skip
    assert code == 1 and "exceeds the operator float booked on base (123 USDC)" in output

    # An agent's deposit waits in its deposit address until swept: the hot wallet's
    # float cannot pay the agent's withdrawal yet.
    address = world.deposit_address("worker")
    world.chain.token.mint(address, 200_000_000)
    with world.sessions() as s, s.begin():
        _book_deposit(s, agent.id, 200_000_000)
        payout = request_payout(
            s,
            chain=CHAIN,
            family="evm",
            asset_symbol="USDC",
            agent_id=agent.id,
            destination=world.chain.accounts[2],
            amount=200_000_000,
            reason=PayoutReason.WITHDRAWAL,
            reference="w-1",
            idempotency_key="w-1",
            min_amount_base_units=1,
            platform=PlatformAddresses.of_keystore(world.keystore, None),
        )
    assert world.cli("reconcile")[0] == 0
    code, output = world.cli("wallets")
    assert code == 1
    assert f"base EVM hot wallet: {world.hot}" in output
    assert "holds 10 ETH" in output
    assert "holds 123 USDC (booked operator float 123 USDC)" in output
    assert "WARNING USDC float 123 is below the 200 USDC of payouts waiting to be sent" in output
    assert f"base EVM gas wallet: {world.keystore.evm_gas_wallet.address}" in output
    assert "WARNING no ETH: every one of its sweeps on base fails" in output
    code, output = world.cli("payouts", "list")
    assert f"{payout.id}\t{CHAIN}\tUSDC\t200000000\trequested" in output
    assert "status: requested" in world.cli("payouts", "show", str(payout.id))[1]


def _book_deposit(session: Session, agent_id: int, amount: int) -> None:
    """What crediting a deposit books: custody -> the agent."""
    ledger.post(
        session,
        [
            ledger.TransferSpec(
                idempotency_key=f"test-deposit-{agent_id}-{amount}",
                debit_account_id=accounts.custody(session, CHAIN, "USDC").id,
                credit_account_id=accounts.agent_available(session, agent_id, "USDC").id,
                amount=amount,
                code=TransferCode.DEPOSIT,
                ref_type="test",
                ref_id=str(agent_id),
            )
        ],
        actor="test",
    )


@pytest.mark.anvil
def test_a_chain_that_cannot_be_read_is_reported_and_the_others_checked(
    world: World, tmp_path: Path
) -> None:
    down = base_chain(
        world.chain, name="other", chain_id=8453, rpc_urls=[f"http://127.0.0.1:{free_port()}"]
    )
    settings = _settings(
        tmp_path, world.settings.database_url or "", [*world.settings.evm_chains, down]
    )
    world.config_path = _write(settings, tmp_path / "two-chains.toml")
    world.deposit_address("buyer")
    world.poll()
    code, output = world.cli("reconcile")
    assert code == 3, output
    assert "base (evm) at block" in output
    assert "USDC: on chain 0, ledger holds 0, in flight 0: ok" in output
    assert "other (evm): cannot be read: RpcUnavailable: all 1 RPC endpoint(s) failed" in output
    assert "Traceback" not in output
    assert "reconcile: no difference in the chains read; not read: other" in output
    code, output = world.cli("reconcile", "--chain", CHAIN)
    assert code == 0, output
    assert "other" not in output
    code, output = world.cli("reconcile", "--chain", "nope")
    assert code == 2
    assert "unknown chain nope (configured: base, other)" in output
    loaded = load_settings(world.config_path, environ={})
    assert [c.name for c in loaded.evm_chains] == [CHAIN, "other"]


def readme_commands(*sections: str) -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    commands = []
    for title in sections:
        body = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        for block in body.split("```sh\n")[1:]:
            commands += [line for line in block.split("```")[0].splitlines() if line]
    return commands


@pytest.mark.anvil
def test_the_readme_operator_commands_do_what_it_says(world: World) -> None:
    commands = readme_commands("Funding the platform wallets", "Reconcile")
    assert len(commands) >= 4 and all(c.startswith("escrowd ") for c in commands)
    chain = world.chain
    chain.w3.eth.send_transaction(
        {
            "from": chain.accounts[0],
            "to": world.keystore.evm_gas_wallet.address,
            "value": Wei(10**18),
        }
    )
    # The operator sends the float first, then books it.
    chain.token.mint(world.hot, 250_000_000)
    for command in commands:
        if "book-withdrawal" in command:
            # ... and takes float back out on chain before booking that.
            _rpc(world, "anvil_impersonateAccount", world.hot)
            chain.token.transfer(world.hot, chain.accounts[2], 50_000_000)
        code, output = world.cli(*command.split()[1:])
        assert code == 0, f"{command}:\n{output}"
        assert "Traceback" not in output
    code, output = world.cli("wallets")
    assert "holds 200 USDC (booked operator float 200 USDC)" in output


@pytest.mark.anvil
def test_the_daemon_job_publishes_the_last_difference_per_chain_and_asset(world: World) -> None:
    settings = world.settings.model_copy(update={"reconcile": ReconcileSettings(enabled=True)})
    ctx = JobContext(
        settings=settings,
        engine=world.engine,
        sessions=world.sessions,
        evm_sources={CHAIN: world.chain.source},
        keystore=world.keystore,
        environ={},
    )
    [job] = reconcile_jobs(ctx)
    assert (job.name, job.interval_s) == ("reconcile", 600.0)
    world.chain.token.mint(world.hot, 42)

    def gauge(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"chain": CHAIN, "asset": "USDC"})

    with captured_logs() as logs:
        job.run()
    assert gauge("escrowd_reconcile_difference_base_units") == 42
    [event] = [e for e in logs if e["event"] == "reconcile_difference"]
    assert (event["chain"], event["asset"], event["difference"]) == (CHAIN, "USDC", 42)
    assert event["log_level"] == "error"
    with world.sessions() as s, s.begin():
        reconcile.record_operator_funding(s, chain=CHAIN, asset="USDC", amount=42, reference="t")
    job.run()
    assert gauge("escrowd_reconcile_difference_base_units") == 0
    assert REGISTRY.get_sample_value("escrowd_reconcile_chain_unreadable", {"chain": CHAIN}) == 0
    assert (
        reconcile_jobs(
            JobContext(settings=world.settings, engine=world.engine, sessions=world.sessions)
        )
        == []
    )
