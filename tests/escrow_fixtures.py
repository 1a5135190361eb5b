"""Builders shared by the escrow service and HTTP API tests."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import typer
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import EvmChainSettings, Settings
from escrowd.daemon.api import create_app
from escrowd.daemon.cli_api import apikey_app
from escrowd.escrow import accounts, apikeys, audit, ledger, service
from escrowd.escrow.payouts import PlatformAddresses
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import Agent, ApiScope, AuditLog, TransferCode
from escrowd.models.registry import ensure_asset
from escrowd.wallets.allocation import AddressDeriver
from escrowd.wallets.hd import (
    EVM_ACCOUNT_PATH,
    EvmXpubDeriver,
    ExtendedPrivateKey,
    SolanaSeedDeriver,
)
from escrowd.wallets.mnemonic import mnemonic_to_seed
from escrowd.wallets.secrets import Secret

USDC_ADDRESS = "0x" + "ab" * 20
CHAIN = "base"
SOLANA_USDC_MINT = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
# The platform's own wallets as a keystore would give them (fixed, public test values).
HOT_EVM = "0x" + "a1" * 20
GAS_EVM = "0x" + "a2" * 20
HOT_SOLANA = "HAgk14JpMQLgt6rVgv7cBQFJWFto5Dqxi472uT3DKpqk"
PLATFORM = PlatformAddresses.of(
    evm={HOT_EVM: "EVM hot wallet", GAS_EVM: "EVM gas wallet"},
    solana={HOT_SOLANA: "Solana hot wallet"},
    solana_usdc_mint=SOLANA_USDC_MINT,
)
_keys = itertools.count(1)


def make_settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        evm_chains=[
            EvmChainSettings(
                name=CHAIN,
                chain_id=8453,
                rpc_urls=["http://127.0.0.1:9"],
                usdc_address=USDC_ADDRESS,
            )
        ],
    )


def seed_asset(session: Session) -> None:
    ensure_asset(session, chain=CHAIN, symbol="USDC", decimals=6, token_address=USDC_ADDRESS)


def credit(session: Session, agent_id: int, amount: int, asset: str = "USDC") -> None:
    """Give an agent `amount` base units, as a confirmed deposit from custody would."""
    ledger.post(
        session,
        [
            ledger.TransferSpec(
                idempotency_key=f"test-credit-{next(_keys)}",
                debit_account_id=accounts.custody(session, CHAIN, asset).id,
                credit_account_id=accounts.agent_available(session, agent_id, asset).id,
                amount=amount,
                code=TransferCode.DEPOSIT,
                ref_type="test",
                ref_id=str(agent_id),
            )
        ],
        actor="test",
    )


def seed_agents(sessions: sessionmaker[Session], *names: str, balance: int = 0) -> dict[str, int]:
    """Register agents (ids by name) and credit each with `balance` base units."""
    ids: dict[str, int] = {}
    with sessions() as s, s.begin():
        seed_asset(s)
        for name in names:
            agent = service.register_agent(s, name, name.title())
            ids[name] = agent.id
            if balance:
                credit(s, agent.id, balance)
    return ids


def row_id(sessions: sessionmaker[Session], external_id: str) -> int:
    """An agent's database row id (EscrowService and the API name agents by external id)."""
    with sessions() as s:
        return s.scalars(select(Agent.id).where(Agent.external_id == external_id)).one()


def available(sessions: sessionmaker[Session], agent_id: int, asset: str = "USDC") -> int:
    with sessions() as s, s.begin():
        return ledger.balance(s, accounts.agent_available(s, agent_id, asset))


def platform_fees(sessions: sessionmaker[Session], asset: str = "USDC") -> int:
    with sessions() as s, s.begin():
        return ledger.balance(s, accounts.platform_fees(s, asset))


def audit_actions(sessions: sessionmaker[Session], stream: str) -> list[str]:
    with sessions() as s:
        return list(
            s.scalars(
                select(AuditLog.action).where(AuditLog.stream == stream).order_by(AuditLog.seq)
            )
        )


def ledger_clean(sessions: sessionmaker[Session]) -> bool:
    with sessions() as s, s.begin():
        return ledger.check(s) == [] and audit.verify(s).ok


def make_key(sessions: sessionmaker[Session], scope: ApiScope) -> str:
    with sessions() as s, s.begin():
        _, key = apikeys.create_key(s, name=f"test-{scope.value}", scope=scope)
    return key


def make_client(
    engine: Engine,
    data_dir: Path,
    *,
    deriver: dict[str, AddressDeriver] | None = None,
    platform: PlatformAddresses | None = PLATFORM,
) -> TestClient:
    app = create_app(
        make_settings(data_dir),
        engine,
        webhook_cipher=SecretCipher(bytes(range(32))),
        deriver=deriver,
        platform=platform,
    )
    return TestClient(app, raise_server_exceptions=False)


def derivers() -> dict[str, AddressDeriver]:
    """Derivers of the public BIP-39 test phrase "abandon ... about", per chain family."""
    seed = mnemonic_to_seed(Secret("abandon " * 11 + "about"))
    xpub = ExtendedPrivateKey.from_seed(seed).derive(EVM_ACCOUNT_PATH).public().serialize()
    return {"evm": EvmXpubDeriver(xpub), "solana": SolanaSeedDeriver(seed)}


def apikey_cli(engine: Engine) -> typer.Typer:
    """`escrowd apikey ...` on `engine`, for CliRunner (the root state holds the engine)."""
    app = typer.Typer()
    app.add_typer(apikey_app, name="apikey")

    class State:
        def __init__(self) -> None:
            self.engine = engine

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = State()

    return app


def waiting_for_a_lock(engine: Engine, within_s: float = 10.0) -> bool:
    """Whether a session of the engine's database comes to wait for a lock within
    `within_s` (PostgreSQL)."""
    deadline = time.monotonic() + within_s
    with engine.connect() as connection:
        while True:
            waiting = connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            )
            connection.rollback()
            if waiting or time.monotonic() > deadline:
                return bool(waiting)
            time.sleep(0.01)
