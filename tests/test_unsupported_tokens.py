"""ERC-20 tokens other than USDC sent to deposit addresses, on anvil: the token scan records
them (any uint256 amount, never credited, an audit row, a deposit.unsupported webhook naming
the agent by the marketplace's id, a metric), and `escrowd tokens recover` moves one to a
named destination exactly once, across a crash between signing and sending and a second
run of the command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import tomli_w
import typer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner
from web3.types import Wei

from escrowd.config.settings import EvmChainSettings, KeystoreSettings, Settings
from escrowd.daemon.cli import CliState
from escrowd.daemon.cli_tokens import tokens_app
from escrowd.devnet.anvil import AnvilProcess
from escrowd.devnet.evm import TestUSDC, deploy_test_usdc, dev_accounts, mine_blocks, web3_for_url
from escrowd.escrow import accounts, ledger
from escrowd.escrow.token_recovery import RecoveryInFlight, RecoveryRequest, TokenRecoverer
from escrowd.escrow.unsupported import UnsupportedDepositRecorder, list_unsupported_deposits
from escrowd.indexer.evm_source import JsonRpcEvmSource
from escrowd.indexer.evm_tokens import UNSUPPORTED_FOUND, TokenScanner
from escrowd.models import (
    Agent,
    AuditLog,
    Chain,
    DepositAddress,
    TokenRecovery,
    UnsupportedDeposit,
    WebhookEvent,
)
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.keystore import UnlockedKeystore, create_keystore
from escrowd.wallets.secrets import Secret
from tests.evm_fixtures import EvmChain, require_anvil
from tests.evm_indexer_helpers import assert_books_clean

pytestmark = pytest.mark.anvil

NETWORK = "anvil"
PASSPHRASE = "tokens-test-passphrase"
BIG = 10**30  # more than BIGINT holds: an 18-decimal token's 10^12 units


@pytest.fixture(scope="module")
def chain() -> Iterator[EvmChain]:
    require_anvil()
    with AnvilProcess() as anvil, requests.Session() as http:
        w3 = web3_for_url(anvil.url, session=http)
        usdc = deploy_test_usdc(w3)
        accounts_ = dev_accounts(w3)
        with JsonRpcEvmSource([anvil.url], chain=NETWORK) as source:
            yield EvmChain(source=source, w3=w3, token=usdc, accounts=accounts_, url=anvil.url)


@pytest.fixture(scope="module")
def keystore(tmp_path_factory: pytest.TempPathFactory) -> UnlockedKeystore:
    path = tmp_path_factory.mktemp("keys") / "keystore.json"
    return create_keystore(path, Secret(PASSPHRASE), scrypt_log2_n=10)


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


def settings_for(chain: EvmChain, **overrides: object) -> EvmChainSettings:
    assert chain.url is not None
    values: dict[str, object] = {
        "name": NETWORK,
        "chain_id": 31337,
        "rpc_urls": [chain.url],
        "usdc_address": chain.token.address,
        "confirmations": 1,
        "poll_interval_s": 0.1,
    }
    values.update(overrides)
    return EvmChainSettings.model_validate(values)


def deposit_address(
    sessions: sessionmaker[Session], keystore: UnlockedKeystore, index: int
) -> tuple[int, str]:
    """An agent whose deposit address is the keystore's derivation ``index``."""
    address = keystore.derive_evm(index).address
    with sessions() as session, session.begin():
        agent = Agent(external_id=f"market-agent-{index}")
        session.add(agent)
        session.flush()
        session.add(
            DepositAddress(
                agent_id=agent.id, chain=Chain.EVM, address=address, derivation_index=index
            )
        )
        return agent.id, address


def other_token(chain: EvmChain, amount: int) -> TestUSDC:
    token = deploy_test_usdc(chain.w3)
    token.mint(chain.accounts[1], amount)
    return token


def scanner(chain: EvmChain, sessions: sessionmaker[Session], batch: int) -> TokenScanner:
    settings = settings_for(chain, token_scan_batch_addresses=batch, start_block=0)
    return TokenScanner(settings, chain.source, sessions, UnsupportedDepositRecorder())


def test_scan_records_other_tokens_once_and_credits_nothing(
    chain: EvmChain, sessions: sessionmaker[Session], keystore: UnlockedKeystore
) -> None:
    alice, alice_addr = deposit_address(sessions, keystore, 0)
    _, bob_addr = deposit_address(sessions, keystore, 1)
    deposit_address(sessions, keystore, 2)
    token = other_token(chain, 2 * BIG)
    sender = chain.accounts[1]
    token.transfer(sender, chain.accounts[3], 7)  # not a deposit address
    chain.token.mint(alice_addr, 1_000)  # USDC: the deposit poller's, not this scan's
    token.transfer(sender, alice_addr, BIG)
    token.transfer(sender, bob_addr, 5)
    before = UNSUPPORTED_FOUND.labels(NETWORK)._value.get()  # type: ignore[attr-defined]

    scan = scanner(chain, sessions, batch=2)  # three addresses: two topic filters a window
    first = scan.scan_once()
    assert first.error is None and first.found == 1  # bob's, in the head block, is not settled
    mine_blocks(chain.w3, 1)
    assert scan.scan_once().found == 1
    assert scan.scan_once().found == 0  # scanned blocks are not read twice
    assert scanner(chain, sessions, batch=1).scan_once().found == 0  # nor recorded twice

    with sessions() as session:
        views = list_unsupported_deposits(session, chain=NETWORK)
        assert [(v.deposit.to_address, v.deposit.amount_base_units) for v in views] == [
            (alice_addr, str(BIG)),
            (bob_addr, "5"),
        ]
        assert views[0].agent == "market-agent-0"
        assert views[0].deposit.token_address == token.address
        events = [
            json.loads(e.payload)
            for e in session.scalars(
                select(WebhookEvent).where(WebhookEvent.type == "deposit.unsupported")
            )
        ]
        assert events[0]["data"]["agent"] == "market-agent-0"
        assert events[0]["data"]["amount_base_units"] == str(BIG)
        assert "agent_id" not in events[0]["data"]
        seen = session.scalar(
            select(func.count())
            .select_from(AuditLog)
            .where(AuditLog.action == "unsupported_deposit_seen")
        )
        assert seen == 2
        assert ledger.balance(session, accounts.agent_available(session, alice, "USDC")) == 0
    assert UNSUPPORTED_FOUND.labels(NETWORK)._value.get() == before + 2  # type: ignore[attr-defined]
    assert_books_clean(sessions)


def _world(chain: EvmChain, sqlite_url: str, keystore: UnlockedKeystore, tmp_path: Path) -> Path:
    settings = Settings(
        data_dir=tmp_path,
        database_url=sqlite_url,
        keystore=KeystoreSettings(path=keystore.path),
        evm_chains=[settings_for(chain)],
    )
    config = tmp_path / "escrowd.toml"
    config.write_text(tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True)))
    gas = keystore.evm_gas_wallet.address
    if chain.w3.eth.get_balance(gas) == 0:  # type: ignore[arg-type]
        chain.w3.eth.send_transaction(
            {"from": chain.accounts[0], "to": gas, "value": Wei(10 * 10**18)}
        )
    return config


def _cli(config: Path) -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = CliState(config_path=config)

    app.add_typer(tokens_app, name="tokens")
    return app


def test_recover_command_moves_the_token_once_and_audits_it(
    chain: EvmChain,
    sessions: sessionmaker[Session],
    sqlite_url: str,
    keystore: UnlockedKeystore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ESCROWD_KEYSTORE_PASSPHRASE", PASSPHRASE)
    _, address = deposit_address(sessions, keystore, 3)
    token = other_token(chain, BIG)
    token.transfer(chain.accounts[1], address, BIG)
    mine_blocks(chain.w3, 1)
    scanner(chain, sessions, batch=500).scan_once()
    config = _world(chain, sqlite_url, keystore, tmp_path)
    destination = chain.accounts[7]
    app, runner = _cli(config), CliRunner()
    args = ["tokens", "recover", "--chain", NETWORK, "--token", token.address]
    args += ["--address", address, "--to", destination, "--operator", "alice-ops"]

    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "confirmed in block" in done.output
    assert token.balance_of(destination) == BIG and token.balance_of(address) == 0
    again = runner.invoke(app, args)  # nothing left: refused, nothing sent
    assert again.exit_code == 1 and "holds none" in again.output
    assert chain.w3.eth.get_transaction_count(address) == 1  # type: ignore[arg-type]

    with sessions() as session:
        [recovery] = session.scalars(select(TokenRecovery)).all()
        assert recovery.status == "confirmed" and recovery.requested_by == "alice-ops"
        actions = session.scalars(
            select(AuditLog.action)
            .where(AuditLog.stream == f"token-recovery:{NETWORK}:{recovery.id}")
            .order_by(AuditLog.seq)
        ).all()
        assert actions == [
            "token_recovery_requested",
            "token_recovery_signed",
            "token_recovery_gas_signed",
            "token_recovery_confirmed",
        ]
        actors = set(
            session.scalars(select(AuditLog.actor).where(AuditLog.stream.like("token-recovery:%")))
        )
        assert actors == {"operator:alice-ops"}
        [row] = session.scalars(select(UnsupportedDeposit)).all()
        assert row.recovery_id == recovery.id
    listed = runner.invoke(app, ["tokens", "list", "--address", address])
    assert f"recovered by #{recovery.id}" in listed.output

    usdc = runner.invoke(app, [*args[:4], "--token", chain.token.address, *args[6:]])
    assert usdc.exit_code == 2 and "is the USDC of anvil" in usdc.output
    stranger = runner.invoke(app, [*args[:6], "--address", chain.accounts[4], *args[8:]])
    assert stranger.exit_code == 2 and "is not a deposit address" in stranger.output
    assert_books_clean(sessions)


def test_recovery_survives_a_crash_between_signing_and_sending(
    chain: EvmChain,
    sessions: sessionmaker[Session],
    keystore: UnlockedKeystore,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    _world(chain, sqlite_url, keystore, tmp_path)
    _, address = deposit_address(sessions, keystore, 4)
    token = other_token(chain, 1_000)
    token.transfer(chain.accounts[1], address, 1_000)
    settings = settings_for(chain)

    def recoverer() -> TokenRecoverer:
        return TokenRecoverer(
            sessions,
            settings,
            chain.source,
            gas_wallet=keystore.evm_gas_wallet,
            deposit_key=keystore.derive_evm,
        )

    request = RecoveryRequest(NETWORK, token.address, address, chain.accounts[8], 600, "ops")
    first = recoverer()
    recovery_id = first.start(request)
    assert first.start(request) == recovery_id  # the same open recovery, not a second
    signed = first.advance(recovery_id)
    assert signed.status == "signed" and signed.tx_hash is not None
    # The process dies here: the transfer is stored, never sent, the address has no gas.
    other_terms = RecoveryRequest(NETWORK, token.address, address, chain.accounts[9], None, "ops")
    with pytest.raises(RecoveryInFlight, match=f"recovery {recovery_id}"):
        recoverer().start(other_terms)

    resumed = recoverer().run(request, wait_s=30, pause_s=0.05)
    assert resumed.status == "confirmed" and resumed.tx_hash == signed.tx_hash
    assert token.balance_of(chain.accounts[8]) == 600 and token.balance_of(address) == 400
    assert chain.w3.eth.get_transaction_count(address) == 1  # type: ignore[arg-type]
    # The rest can be recovered afterwards: a new recovery, the next nonce.
    rest = recoverer().run(
        RecoveryRequest(NETWORK, token.address, address, chain.accounts[8], None, "ops"),
        wait_s=30,
        pause_s=0.05,
    )
    assert rest.status == "confirmed" and rest.recovery_id != recovery_id
    assert token.balance_of(chain.accounts[8]) == 1_000
