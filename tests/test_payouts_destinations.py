"""Request-side checks: bad destinations (malformed, zero, our deposit addresses, the
platform's own wallets), dust and insufficient balance are refused with a typed error and
nothing held (no payout row, no ledger transfer, no audit row, balance unchanged)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import EscrowdError, InsufficientFunds, Unavailable, ValidationFailed
from escrowd.config.settings import Settings, SolanaSettings
from escrowd.daemon.api import create_app
from escrowd.escrow import EscrowService, accounts, ledger, service
from escrowd.escrow.payouts import PlatformAddresses, request_payout
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import (
    ApiScope,
    AuditLog,
    DepositAddress,
    IdempotencyKey,
    LedgerAccount,
    LedgerTransfer,
    Payout,
    PayoutReason,
    TransferCode,
    WebhookEvent,
)
from escrowd.models.db import make_engine, make_session_factory
from escrowd.models.registry import ensure_asset
from escrowd.wallets.addresses import associated_token_address
from escrowd.wallets.errors import InvalidAddress
from escrowd.wallets.keystore import UnlockedKeystore, create_keystore
from escrowd.wallets.secrets import Secret
from tests.escrow_fixtures import (
    CHAIN,
    PLATFORM,
    available,
    make_key,
    make_settings,
    seed_agents,
)


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    # Request-side validation only: SQLite is enough (the race tests cover PostgreSQL).
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


OWN_EVM = "0x" + "5a" * 20
OWN_SOLANA = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"


def _attempt(
    sessions: sessionmaker[Session],
    agent_id: int,
    *,
    family: str,
    destination: str,
    amount: int,
    minimum: int = 10_000,
) -> None:
    with sessions() as s, s.begin():
        request_payout(
            s,
            chain=CHAIN,
            family=family,
            asset_symbol="USDC",
            agent_id=agent_id,
            destination=destination,
            amount=amount,
            reason=PayoutReason.WITHDRAWAL,
            reference="t",
            idempotency_key=f"dest-{destination}-{amount}",
            min_amount_base_units=minimum,
            platform=PLATFORM,
        )


@pytest.mark.parametrize(
    ("family", "destination", "amount", "error", "message"),
    [
        ("evm", "0x1234", 1_000_000, ValidationFailed, None),
        ("evm", "0x" + "00" * 20, 1_000_000, ValidationFailed, "zero"),
        ("evm", "0x" + "AB" * 19 + "aB", 1_000_000, ValidationFailed, "checksum"),
        ("evm", OWN_EVM, 1_000_000, ValidationFailed, "own deposit"),
        ("evm", OWN_EVM.upper().replace("0X", "0x"), 1_000_000, ValidationFailed, "own deposit"),
        ("solana", "not-base58-0OIl", 1_000_000, ValidationFailed, None),
        ("solana", "11111111111111111111111111111111", 1_000_000, ValidationFailed, "system"),
        ("solana", OWN_SOLANA, 1_000_000, ValidationFailed, "own deposit"),
        ("evm", "0x" + "12" * 20, 9_999, ValidationFailed, "minimum"),
        ("evm", "0x" + "12" * 20, 5_000_001, InsufficientFunds, "cannot cover"),
    ],
)
def test_refused_payout_holds_nothing(
    sessions: sessionmaker[Session],
    family: str,
    destination: str,
    amount: int,
    error: type[EscrowdError],
    message: str | None,
) -> None:
    ids = seed_agents(sessions, "agent", balance=5_000_000)
    with sessions() as s, s.begin():
        s.add(
            DepositAddress(agent_id=ids["agent"], chain="evm", address=OWN_EVM, derivation_index=0)
        )
        s.add(
            DepositAddress(
                agent_id=ids["agent"], chain="solana", address=OWN_SOLANA, derivation_index=0
            )
        )
    with sessions() as s:
        transfers_before = s.scalar(select(func.count()).select_from(LedgerTransfer))
    with pytest.raises(error, match=message):
        _attempt(sessions, ids["agent"], family=family, destination=destination, amount=amount)
    assert available(sessions, ids["agent"]) == 5_000_000
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Payout)) == 0
        assert s.scalar(select(func.count()).select_from(LedgerTransfer)) == transfers_before


def test_valid_payout_holds_the_amount(sessions: sessionmaker[Session]) -> None:
    ids = seed_agents(sessions, "agent", balance=5_000_000)
    _attempt(sessions, ids["agent"], family="evm", destination="0x" + "12" * 20, amount=5_000_000)
    assert available(sessions, ids["agent"]) == 0
    with sessions() as s:
        assert s.scalars(select(Payout.status)).one() == "requested"
    with pytest.raises(InsufficientFunds):
        _attempt(sessions, ids["agent"], family="evm", destination="0x" + "34" * 20, amount=10_000)


# --- the platform's own wallets (hot wallet = payout signer and sweep target, gas wallet) ---

SOLANA = "solana"
SOLANA_USDC_MINT = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
BALANCE = 5_000_000


@pytest.fixture(scope="module")
def keystore(tmp_path_factory: pytest.TempPathFactory) -> UnlockedKeystore:
    path = tmp_path_factory.mktemp("keys") / "keystore.json"
    return create_keystore(path, Secret("destinations-test"), scrypt_log2_n=10)


def _own_wallet(keystore: UnlockedKeystore, kind: str) -> tuple[str, str, str, str]:
    """(chain, asset, destination, role named in the error) of one platform address kind."""
    hot_evm = keystore.evm_hot_wallet.address
    hot_solana = keystore.solana_hot_wallet.address
    return {
        "evm-hot": (CHAIN, "USDC", hot_evm, "EVM hot wallet"),
        "evm-hot-lowercase": (CHAIN, "USDC", hot_evm.lower(), "EVM hot wallet"),
        "evm-gas-uppercase": (
            CHAIN,
            "USDC",
            "0x" + keystore.evm_gas_wallet.address[2:].upper(),
            "EVM gas wallet",
        ),
        "solana-hot-sol": (SOLANA, "SOL", hot_solana, "Solana hot wallet"),
        "solana-hot-usdc": (SOLANA, "USDC", hot_solana, "Solana hot wallet"),
        "solana-hot-usdc-token-account": (
            SOLANA,
            "USDC",
            associated_token_address(hot_solana, SOLANA_USDC_MINT),
            "Solana hot wallet USDC token account",
        ),
    }[kind]


OWN_KINDS = [
    "evm-hot",
    "evm-hot-lowercase",
    "evm-gas-uppercase",
    "solana-hot-sol",
    "solana-hot-usdc",
    "solana-hot-usdc-token-account",
]


def _settings(tmp_path: Path) -> Settings:
    solana = SolanaSettings(rpc_urls=["http://127.0.0.1:9"], usdc_mint=SOLANA_USDC_MINT)
    return make_settings(tmp_path).model_copy(update={"solana": solana})


def _platform(keystore: UnlockedKeystore) -> PlatformAddresses:
    return PlatformAddresses.of_keystore(keystore, SOLANA_USDC_MINT)


def _seed(sessions: sessionmaker[Session]) -> int:
    """An agent holding BALANCE of USDC and of SOL; USDC and SOL registered on Solana."""
    ids = seed_agents(sessions, "agent", balance=BALANCE)
    with sessions() as s, s.begin():
        ensure_asset(s, chain=SOLANA, symbol="USDC", decimals=6, token_address=SOLANA_USDC_MINT)
        ensure_asset(s, chain=SOLANA, symbol="SOL", decimals=9, token_address=None)
        ledger.post(
            s,
            [
                ledger.TransferSpec(
                    idempotency_key="test-sol-deposit",
                    debit_account_id=accounts.custody(s, SOLANA, "SOL").id,
                    credit_account_id=accounts.agent_available(s, ids["agent"], "SOL").id,
                    amount=BALANCE,
                    code=TransferCode.DEPOSIT,
                    ref_type="test",
                    ref_id=str(ids["agent"]),
                )
            ],
            actor="test",
        )
    return ids["agent"]


def _rows(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Row counts of everything a payout request (or an API mutation) writes."""
    tables = [Payout, LedgerTransfer, LedgerAccount, AuditLog, WebhookEvent, IdempotencyKey]
    with sessions() as s:
        return {
            table.__tablename__: s.scalar(select(func.count()).select_from(table)) or 0
            for table in tables
        }


def _balances(sessions: sessionmaker[Session], agent_id: int) -> tuple[int, int]:
    return available(sessions, agent_id, "USDC"), available(sessions, agent_id, "SOL")


@pytest.mark.parametrize("kind", OWN_KINDS)
def test_service_refuses_the_platforms_own_wallets(
    engine: Engine, keystore: UnlockedKeystore, kind: str
) -> None:
    sessions = make_session_factory(engine)
    agent_id = _seed(sessions)
    chain, asset, destination, role = _own_wallet(keystore, kind)
    before = _rows(sessions)
    refusal = pytest.raises(InvalidAddress, match=f"escrowd's own {role};")
    with refusal as refused, sessions() as s, s.begin():
        service.withdraw(
            s,
            agent=service.get_agent(s, "agent"),
            asset=asset,
            chain=chain,
            family="evm" if chain == CHAIN else "solana",
            to_address=destination,
            amount=1_000_000,
            idempotency_key=f"own-{kind}",
            min_amount_base_units=1,
            platform=_platform(keystore),
        )
    assert refused.value.http_status == 400
    assert refused.value.type == "invalid_address"
    assert _rows(sessions) == before
    assert _balances(sessions, agent_id) == (BALANCE, BALANCE)


@pytest.fixture
def client(engine: Engine, keystore: UnlockedKeystore, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(
        _settings(tmp_path),
        engine,
        webhook_cipher=SecretCipher(bytes(32)),
        platform=_platform(keystore),
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _withdraw(
    client: TestClient, key: str, idempotency_key: str, chain: str, asset: str, destination: str
) -> Response:
    return client.post(
        "/v1/withdrawals",
        json={
            "agent_id": "agent",
            "asset": asset,
            "chain": chain,
            "to_address": destination,
            "amount": "1",
        },
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": idempotency_key},
    )


def test_api_refuses_every_platform_wallet_and_pays_an_outside_address(
    engine: Engine, client: TestClient, keystore: UnlockedKeystore
) -> None:
    sessions = make_session_factory(engine)
    agent_id = _seed(sessions)
    key = make_key(sessions, ApiScope.WRITE)
    before = _rows(sessions)
    for kind in OWN_KINDS:
        chain, asset, destination, role = _own_wallet(keystore, kind)
        response = _withdraw(client, key, f"own-{kind}", chain, asset, destination)
        assert response.status_code == 400, (kind, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_address"
        assert error["message"] == (
            f"the destination is escrowd's own {role}; pay out to an address outside the platform"
        )
    assert _rows(sessions) == before
    assert _balances(sessions, agent_id) == (BALANCE, BALANCE)

    # The same request to an address outside the platform is held as usual.
    accepted = _withdraw(client, key, "outside", CHAIN, "USDC", "0x" + "12" * 20)
    assert accepted.status_code == 201, accepted.text
    assert _balances(sessions, agent_id) == (BALANCE - 1_000_000, BALANCE)


def test_withdrawals_need_the_platform_wallets(
    engine: Engine, keystore: UnlockedKeystore, tmp_path: Path
) -> None:
    """Without the keystore's wallets a destination cannot be checked: refused, not held."""
    sessions = make_session_factory(engine)
    agent_id = _seed(sessions)
    key = make_key(sessions, ApiScope.WRITE)
    before = _rows(sessions)
    app = create_app(_settings(tmp_path), engine, webhook_cipher=SecretCipher(bytes(32)))
    with TestClient(app, raise_server_exceptions=False) as blind:
        response = _withdraw(blind, key, "blind", CHAIN, "USDC", keystore.evm_hot_wallet.address)
    assert response.status_code == 503
    assert "keystore not unlocked" in response.json()["error"]["message"]
    library = EscrowService(engine, _settings(tmp_path))
    with pytest.raises(Unavailable, match="platform=PlatformAddresses"):
        library.withdraw(
            agent="agent",
            asset="USDC",
            chain=CHAIN,
            to_address="0x" + "12" * 20,
            amount=1_000_000,
            idempotency_key="library",
        )
    assert _rows(sessions) == before
    assert _balances(sessions, agent_id) == (BALANCE, BALANCE)
