"""A payout world on anvil: keystore hot wallet funded on chain, a migrated SQLite file,
settings written to a TOML file (for worker subprocesses), and helpers to credit agents,
request payouts, read Transfer logs and reconcile."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from eth_account import Account
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from web3.types import Wei

from escrowd.config.settings import EvmChainSettings, KeystoreSettings, PayoutSettings, Settings
from escrowd.devnet.anvil import REPO_ROOT
from escrowd.escrow import accounts, audit, ledger, reconcile
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.escrow.payout_worker import EvmPayoutChain, PayoutWorker, WorkerOptions
from escrowd.escrow.payouts import PlatformAddresses, request_payout
from escrowd.indexer.evm_sender import EvmSender
from escrowd.models import (
    Deposit,
    DepositAddress,
    DepositStatus,
    Payout,
    PayoutReason,
    PayoutStatus,
    TransferCode,
)
from escrowd.models.registry import ensure_asset, find_asset
from escrowd.wallets.keystore import UnlockedKeystore, create_keystore
from escrowd.wallets.secrets import Secret
from tests.evm_fixtures import EvmChain

PASSPHRASE = "payout-test-passphrase"
CHAIN = "anvil"
_keys = itertools.count(1)


def random_address() -> str:
    return str(Account.create().address)


@dataclass
class EvmPayoutWorld:
    chain: EvmChain
    settings: Settings
    config_path: Path
    engine: Engine
    sessions: sessionmaker[Session]
    keystore: UnlockedKeystore

    @property
    def hot(self) -> str:
        return self.keystore.evm_hot_wallet.address

    @property
    def token(self) -> str:
        return self.chain.token.address

    def sender(self, *, confirmations: int = 1, max_fee_gwei: int = 200) -> EvmSender:
        return EvmSender(
            self.chain.source,
            self.keystore.evm_hot_wallet,
            chain=CHAIN,
            chain_id=31337,
            max_fee_gwei=max_fee_gwei,
            confirmations=confirmations,
        )

    def worker(
        self, worker_id: str = "w1", sender: EvmSender | None = None, **options: object
    ) -> PayoutWorker:
        return PayoutWorker(
            self.sessions,
            EvmPayoutChain(sender or self.sender()),
            WorkerOptions(worker_id=worker_id, **options),  # type: ignore[arg-type]
        )

    def credit(self, session: Session, agent_id: int, amount: int) -> None:
        """An agent deposit: the coins arrive in the hot wallet, custody -> agent."""
        self.chain.token.mint(self.hot, amount)
        ledger.post(
            session,
            [
                ledger.TransferSpec(
                    idempotency_key=f"test-deposit-{next(_keys)}",
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

    def request(
        self,
        session: Session,
        agent_id: int,
        destination: str,
        amount: int,
        key: str,
        *,
        reason: PayoutReason = PayoutReason.WITHDRAWAL,
        escrow_id: int | None = None,
    ) -> Payout:
        return request_payout(
            session,
            chain=CHAIN,
            family="evm",
            asset_symbol="USDC",
            agent_id=agent_id,
            destination=destination,
            amount=amount,
            reason=reason,
            reference=key,
            idempotency_key=key,
            min_amount_base_units=1,
            platform=PlatformAddresses.of_keystore(self.keystore, None),
            escrow_id=escrow_id,
        )

    def transfers_from_hot(self) -> Counter[tuple[str, int]]:
        head = self.chain.source.head()
        logs = self.chain.source.get_transfer_logs(self.token, 0, head)
        return Counter((log.to_addr, log.amount) for log in logs if log.from_addr == self.hot)

    def reconcile_differences(self) -> list[reconcile.Difference]:
        with self.sessions() as session:
            lines = reconcile.reconcile_chain(
                session,
                chain=CHAIN,
                addresses=reconcile.custody_addresses(session, "evm", self.hot),
                read_balance=lambda asset, addresses: sum(
                    self.chain.source.erc20_balance(self.token, a) for a in addresses
                ),
            )
        return reconcile.differences(lines)

    def ledger_clean(self) -> bool:
        with self.sessions() as session:
            return ledger.check(session) == [] and audit.verify(session).ok

    def statuses(self) -> Counter[str]:
        with self.sessions() as session:
            return Counter(session.scalars(select(Payout.status)))

    def run_worker_process(
        self,
        worker_id: str,
        *,
        crash_at: str | None = None,
        crash_after: int = 1,
        timeout_s: float = 60.0,
        hang: bool = False,
    ) -> subprocess.Popen[bytes]:
        """A worker process; with `crash_at` it exits 137 there, or with `hang` stops
        there alive until the test kills it."""
        env = dict(os.environ)
        env["ESCROWD_KEYSTORE_PASSPHRASE"] = PASSPHRASE
        for name in (
            "ESCROWD_TEST_CRASH_AT",
            "ESCROWD_TEST_CRASH_AFTER",
            "ESCROWD_TEST_CRASH_HANG",
        ):
            env.pop(name, None)
        if crash_at is not None:
            env["ESCROWD_TEST_CRASH_AT"] = crash_at
            env["ESCROWD_TEST_CRASH_AFTER"] = str(crash_after)
            if hang:
                env["ESCROWD_TEST_CRASH_HANG"] = "1"
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "escrowd.escrow.payout_worker",
                "--config",
                str(self.config_path),
                "--chain",
                CHAIN,
                "--worker-id",
                worker_id,
                "--until-idle",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )


def record_deposit(
    session: Session,
    *,
    chain: str,
    asset: str,
    address: str,
    amount: int,
    credited: bool = True,
) -> Deposit:
    """The row the indexer writes for a deposit to one of our addresses: credited (at its
    confirmation depth, through the ledger sink) or still pending. The coins are the
    caller's to put on chain."""
    asset_row = find_asset(session, chain, asset)
    assert asset_row is not None
    deposit_address = session.scalars(
        select(DepositAddress).where(DepositAddress.address == address)
    ).one()
    deposit = Deposit(
        chain=chain,
        tx_hash=f"0x{next(_keys):064x}",
        log_index=0,
        asset_id=asset_row.id,
        agent_id=deposit_address.agent_id,
        deposit_address_id=deposit_address.id,
        amount=amount,
        block_number=1,
        block_hash=f"0x{0:064x}",
        status=DepositStatus.PENDING,
    )
    session.add(deposit)
    session.flush()
    if credited:
        # Credited as the confirmation step does: the ledger transfer names the deposit.
        LedgerDepositSink().confirmed(session, deposit)
    return deposit


def make_evm_world(chain: EvmChain, db_url: str, engine: Engine, tmp_path: Path) -> EvmPayoutWorld:
    from escrowd.models.db import make_session_factory

    assert chain.url is not None
    keystore = create_keystore(tmp_path / "keystore.json", Secret(PASSPHRASE), scrypt_log2_n=10)
    settings = Settings(
        data_dir=tmp_path,
        database_url=db_url,
        keystore=KeystoreSettings(path=tmp_path / "keystore.json"),
        payouts=PayoutSettings(min_usdc_base_units=1),
        evm_chains=[
            EvmChainSettings(
                name=CHAIN,
                chain_id=31337,
                rpc_urls=[chain.url],
                usdc_address=chain.token.address,
                confirmations=1,
            )
        ],
    )
    config_path = tmp_path / "escrowd.toml"
    config_path.write_text(tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True)))
    # Gas for the hot wallet: 100 ETH from a dev account.
    chain.w3.eth.send_transaction(
        {
            "from": chain.accounts[0],
            "to": keystore.evm_hot_wallet.address,
            "value": Wei(100 * 10**18),
        }
    )
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        ensure_asset(
            session, chain=CHAIN, symbol="USDC", decimals=6, token_address=chain.token.address
        )
    return EvmPayoutWorld(chain, settings, config_path, engine, sessions, keystore)


__all__ = [
    "PASSPHRASE",
    "EvmPayoutWorld",
    "PayoutStatus",
    "make_evm_world",
    "random_address",
    "record_deposit",
]
