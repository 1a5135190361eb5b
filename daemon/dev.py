"""`escrowd dev`: the whole system on one machine with nothing to set up.

A data directory with a SQLite file and a dev keystore, an in-process EVM (eth-tester)
with TestUSDC deployed, the LiteSVM Solana simulator with a USDC mint, and the daemon
(every job plus the API on localhost) wired to them. `--demo` drives a scripted
deposit -> escrow -> release -> payout -> audit run through the HTTP API and exits.

The simulated chains live only as long as the process, so each start begins with a fresh
database; the keystore and its passphrase are kept.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any

import httpx
import typer
from eth_account import Account
from solders.pubkey import Pubkey
from web3.types import Wei

from escrowd.config.settings import (
    ApiSettings,
    DaemonSettings,
    EscrowSettings,
    EvmChainSettings,
    KeystoreSettings,
    PayoutSettings,
    Settings,
    SolanaSettings,
    WebhookSettings,
)
from escrowd.daemon.jobs import Job
from escrowd.daemon.notify import Notifier
from escrowd.daemon.runner import Daemon, DaemonParts
from escrowd.devnet.evm import deploy_test_usdc, dev_accounts, web3_for_tester
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import apikeys, ledger
from escrowd.indexer.evm_source import EthTesterSource
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import ApiScope
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.keystore import UnlockedKeystore, create_keystore, unlock_keystore
from escrowd.wallets.secrets import Secret

# Deposit addresses are stored per chain family ("evm"); naming the dev EVM chain after
# its family lets the EVM poller watch the addresses the API allocates.
EVM_CHAIN = "evm"
SOLANA_CHAIN = "solana"
DB_NAME = "escrowd-dev.db"
KEYSTORE_NAME = "keystore.json"
PASSPHRASE_NAME = "keystore-passphrase"
DEV_SCRYPT_LOG2_N = 12
EVM_CONFIRMATIONS = 3
MINE_INTERVAL_S = 0.3
SOLANA_SLOT_MS = 40
USDC = 10**6
LAMPORTS_PER_SOL = 10**9
DEMO_TIMEOUT_S = 90.0


class DemoFailed(Exception):
    """A demo step did not reach its expected state."""


class LockedEvmSource:
    """eth-tester is not thread-safe: the poller, the payout worker, the miner and the
    demo all reach it through this one lock."""

    def __init__(self, source: EthTesterSource, lock: threading.RLock) -> None:
        self._source = source
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._source, name)
        if not callable(attribute):
            return attribute

        @wraps(attribute)
        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return attribute(*args, **kwargs)

        return locked


def _echo(message: str) -> None:
    typer.echo(message)


def _dev_passphrase(data_dir: Path) -> Secret[str]:
    """Generated once and kept next to the keystore, mode 0600: for dev only, never prod."""
    path = data_dir / PASSPHRASE_NAME
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(24), encoding="utf-8")
    path.chmod(0o600)
    return Secret(path.read_text(encoding="utf-8").strip())


def _dev_keystore(data_dir: Path) -> UnlockedKeystore:
    path = data_dir / KEYSTORE_NAME
    passphrase = _dev_passphrase(data_dir)
    if path.exists():
        return unlock_keystore(path, passphrase)
    keystore = create_keystore(path, passphrase, scrypt_log2_n=DEV_SCRYPT_LOG2_N)
    _echo(f"keystore: created {path} with a fresh dev mnemonic (passphrase in {PASSPHRASE_NAME})")
    return keystore


@dataclass
class DevWorld:
    settings: Settings
    daemon: Daemon
    evm: LockedEvmSource
    evm_lock: threading.RLock
    usdc: Any
    solana: SolanaSimulator
    solana_usdc: Pubkey
    api_key: str
    closers: list[Callable[[], None]]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.api_port}"


def _settings(
    data_dir: Path, port: int, *, chain_id: int, usdc: str, rpc: str, mint: str
) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / DB_NAME}",
        keystore=KeystoreSettings(
            path=data_dir / KEYSTORE_NAME,
            passphrase_file=data_dir / PASSPHRASE_NAME,
            scrypt_log2_n=DEV_SCRYPT_LOG2_N,
        ),
        api=ApiSettings(host="127.0.0.1", port=port),
        escrow=EscrowSettings(expiry_interval_s=1.0),
        payouts=PayoutSettings(interval_s=0.5, min_usdc_base_units=1, min_sol_lamports=1),
        webhooks=WebhookSettings(interval_s=1.0),
        daemon=DaemonSettings(shutdown_timeout_s=15.0, audit_checkpoint_interval_s=10.0),
        evm_chains=[
            EvmChainSettings(
                name=EVM_CHAIN,
                chain_id=chain_id,
                rpc_urls=["eth-tester://in-process"],
                usdc_address=usdc,
                confirmations=EVM_CONFIRMATIONS,
                poll_interval_s=0.5,
            )
        ],
        solana=SolanaSettings(
            name=SOLANA_CHAIN, rpc_urls=[rpc], usdc_mint=mint, poll_interval_s=0.5
        ),
    )


def start_world(data_dir: Path, port: int) -> DevWorld:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keystore = _dev_keystore(data_dir)
    db_path = data_dir / DB_NAME
    for stale in (
        db_path,
        db_path.with_name(DB_NAME + "-wal"),
        db_path.with_name(DB_NAME + "-shm"),
    ):
        stale.unlink(missing_ok=True)

    evm_lock = threading.RLock()
    tester_source = EthTesterSource()
    evm = LockedEvmSource(tester_source, evm_lock)
    w3 = web3_for_tester(tester_source.tester)
    with evm_lock:
        usdc = deploy_test_usdc(w3)
        # Gas and float for the hot wallet: deposits stay at their deposit addresses until
        # a sweep moves them, so payouts are paid from this operator-funded balance.
        hot = keystore.evm_hot_wallet.address
        w3.eth.send_transaction({"from": dev_accounts(w3)[0], "to": hot, "value": Wei(10 * 10**18)})
        usdc.mint(hot, 1_000 * USDC)
        # The sweep job pays deposit addresses' gas from the gas wallet.
        gas = keystore.evm_gas_wallet.address
        w3.eth.send_transaction({"from": dev_accounts(w3)[0], "to": gas, "value": Wei(10 * 10**18)})
    _echo(f"evm: eth-tester chain {tester_source.chain_id()}, TestUSDC at {usdc.address}")

    solana = SolanaSimulator(slot_ms=SOLANA_SLOT_MS).start()
    solana_usdc = solana.create_usdc_mint()
    solana.airdrop(Pubkey.from_string(keystore.solana_hot_wallet.address), 10 * LAMPORTS_PER_SOL)
    _echo(f"solana: LiteSVM simulator at {solana.url}, USDC mint {solana_usdc}")

    settings = _settings(
        data_dir,
        port,
        chain_id=tester_source.chain_id(),
        usdc=usdc.address,
        rpc=solana.url,
        mint=str(solana_usdc),
    )
    engine = make_engine(settings.resolved_database_url)
    upgrade_to_head(engine)
    with make_session_factory(engine)() as session, session.begin():
        _, api_key = apikeys.create_key(session, name="dev", scope=ApiScope.ADMIN)

    def mine() -> object:
        return evm.mine_blocks(1)

    solana_source = SolanaRpcSource([solana.url], timeout_s=5.0)
    closers: list[Callable[[], None]] = [solana_source.close, solana.stop, engine.dispose]
    daemon = Daemon(
        settings,
        engine,
        parts=DaemonParts(
            evm_sources={EVM_CHAIN: evm},
            solana_source=solana_source,
            keystore=keystore,
            extra_jobs=[Job("devnet_mine_evm", MINE_INTERVAL_S, mine)],
            environ={},
        ),
        notifier=Notifier(environ={}),
    )
    daemon.start()
    return DevWorld(settings, daemon, evm, evm_lock, usdc, solana, solana_usdc, api_key, closers)


def stop_world(world: DevWorld) -> int:
    world.daemon.stop_event.set()
    code = world.daemon.shutdown()
    for close in world.closers:
        close()
    return code


# --- the demo --------------------------------------------------------------------------


class Demo:
    def __init__(self, world: DevWorld) -> None:
        self.world = world
        self.client = httpx.Client(
            base_url=world.base_url,
            headers={"Authorization": f"Bearer {world.api_key}"},
            timeout=30.0,
        )
        self.step_no = 0
        self.real: list[str] = []
        self.skipped: list[str] = []
        self.run_id = uuid.uuid4().hex[:6]
        self.buyer = f"buyer-{self.run_id}"
        self.worker = f"worker-{self.run_id}"
        self.job_id = f"job-{self.run_id}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Idempotency-Key": uuid.uuid4().hex} if method == "POST" else {}
        response = self.client.request(method, f"/v1{path}", json=body, headers=headers)
        if response.status_code >= 400:
            raise DemoFailed(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json()

    def step(self, title: str, action: Callable[[], str], needs_job: str | None = None) -> None:
        self.step_no += 1
        label = f"[{self.step_no:2}] {title}"
        if needs_job is not None and not any(
            job.name.startswith(needs_job) for job in self.world.daemon.jobs
        ):
            self.skipped.append(title)
            _echo(f"{label}: skipped: the {needs_job} job is not available in this build")
            return
        started = time.monotonic()
        detail = action()
        self.real.append(title)
        _echo(f"{label}: ok ({time.monotonic() - started:.1f}s) {detail}")

    def wait_until(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEMO_TIMEOUT_S
        while not check():
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out after {DEMO_TIMEOUT_S:.0f}s waiting for {what}")
            time.sleep(0.2)

    def balances(self, agent: str) -> dict[str, int]:
        body = self._call("GET", f"/agents/{agent}/balances")
        return {b["asset"]: int(b["available_base_units"]) for b in body["balances"]}

    def run(self) -> None:
        world = self.world
        addresses: dict[str, str] = {}

        def create_agents() -> str:
            for agent in (self.buyer, self.worker):
                self._call("POST", "/agents", {"id": agent})
            return f"buyer={self.buyer} worker={self.worker}"

        def derive() -> str:
            for family in (EVM_CHAIN, SOLANA_CHAIN):
                out = self._call("POST", f"/agents/{self.buyer}/deposit-addresses/{family}")
                addresses[family] = out["address"]
            return f"evm={addresses[EVM_CHAIN]} solana={addresses[SOLANA_CHAIN]}"

        def deposit_evm() -> str:
            with world.evm_lock:
                customer = dev_accounts(world.usdc.w3)[1]
                world.usdc.mint(customer, 100 * USDC)
                tx = world.usdc.transfer(customer, addresses[EVM_CHAIN], 100 * USDC)
            return f"100 USDC, tx {tx}"

        def deposit_solana() -> str:
            owner = Pubkey.from_string(addresses[SOLANA_CHAIN])
            sol_sig = world.solana.transfer_sol(world.solana.faucet, owner, 2 * LAMPORTS_PER_SOL)
            usdc_sig = world.solana.mint_to(world.solana_usdc, owner, 50 * USDC)
            return f"2 SOL (sig {str(sol_sig)[:16]}...), 50 USDC (sig {str(usdc_sig)[:16]}...)"

        def confirmations() -> str:
            expected = {"USDC": 150 * USDC, "SOL": 2 * LAMPORTS_PER_SOL}
            self.wait_until(
                "deposits to be confirmed and credited",
                lambda: all(self.balances(self.buyer).get(a, 0) >= n for a, n in expected.items()),
            )
            return f"buyer credited {self._show(self.balances(self.buyer))}"

        def fund() -> str:
            body = {
                "job_id": self.job_id,
                "buyer": self.buyer,
                "worker": self.worker,
                "asset": "USDC",
                "amount": "120",
                "fee_bps": 250,
            }
            out = self._call("POST", "/escrows", body)
            return f"escrow {self.job_id} {out['status']} with 120 USDC"

        def release() -> str:
            out = self._call("POST", f"/escrows/{self.job_id}/release")
            return f"{out['status']}: worker gets 117 USDC, platform fee 3 USDC (250 bps)"

        payout_to = str(Account.create().address)

        def payout() -> str:
            out = self._call(
                "POST",
                "/withdrawals",
                {
                    "agent_id": self.worker,
                    "asset": "USDC",
                    "network": EVM_CHAIN,
                    "to_address": payout_to,
                    "amount": "117",
                },
            )
            payout_id = int(out["id"])
            self.wait_until(
                "the payout to confirm", lambda: self._payout_status(payout_id) == "confirmed"
            )
            with world.evm_lock:
                on_chain = world.usdc.balance_of(payout_to)
            if on_chain != 117 * USDC:
                raise DemoFailed(f"payout destination holds {on_chain}, expected {117 * USDC}")
            return f"payout {payout_id} confirmed: {payout_to} holds 117 USDC on chain"

        def show_balances() -> str:
            return (
                f"buyer {self._show(self.balances(self.buyer))}; "
                f"worker {self._show(self.balances(self.worker))}"
            )

        def audit_verify() -> str:
            out = self._call("POST", "/audit/verify")
            if not out.get("ok"):
                raise DemoFailed(f"audit verify failed: {out}")
            return f"{out.get('rows_checked')} rows in {out.get('streams_checked')} streams"

        def ledger_check() -> str:
            with make_session_factory(world.daemon.engine, read_only=True)() as session:
                violations = ledger.check(session)
            if violations:
                raise DemoFailed("; ".join(v.message for v in violations))
            return "all invariants hold"

        self.step("create a buyer and a worker", create_agents)
        self.step("derive the buyer's deposit addresses", derive)
        self.step("deposit USDC on the EVM chain", deposit_evm)
        self.step("deposit SOL and USDC on Solana", deposit_solana)
        self.step("wait for confirmations (EVM depth, Solana finalized)", confirmations)
        self.step("fund an escrow from the buyer", fund)
        self.step("release it to the worker, minus the fee", release)
        self.step("pay the worker out on chain", payout, needs_job="payouts:")
        self.step("balances", show_balances)
        self.step("audit verify", audit_verify)
        self.step("ledger check", ledger_check)

    def _payout_status(self, payout_id: int) -> str:
        status: str = self._call("GET", f"/withdrawals/{payout_id}")["status"]
        return status

    @staticmethod
    def _show(balances: dict[str, int]) -> str:
        decimals = {"USDC": 6, "SOL": 9}
        return ", ".join(
            f"{_decimal(amount, decimals.get(asset, 0))} {asset}"
            for asset, amount in sorted(balances.items())
        )


def _decimal(amount_base_units: int, decimals: int) -> str:
    whole, fraction = divmod(amount_base_units, 10**decimals)
    text = f"{fraction:0{decimals}d}".rstrip("0") if decimals else ""
    return f"{whole}.{text}" if text else str(whole)


def run_dev(data_dir: Path, *, demo: bool, port: int) -> int:
    """Start the dev world; with `demo` run the script and return its exit code,
    otherwise serve until SIGTERM/Ctrl-C."""
    data_dir = data_dir.expanduser().resolve()
    world = start_world(data_dir, 0 if demo else port)
    _echo(f"api: {world.base_url}  (docs: {world.base_url}/docs)")
    _echo(f"dev API key (admin scope, shown once): {world.api_key}")
    if not demo:
        world.daemon.install_signal_handlers()
        _echo("running; Ctrl-C to stop")
        world.daemon.watch()
        return stop_world(world)
    script = Demo(world)
    failed: str | None = None
    try:
        script.run()
    except DemoFailed as exc:
        failed = str(exc)
    finally:
        script.client.close()
        stop_code = stop_world(world)
    if failed is not None:
        _echo(f"demo FAILED: {failed}")
        return 1
    _echo(
        f"demo complete: {len(script.real)} steps ran"
        + (
            f", {len(script.skipped)} skipped ({'; '.join(script.skipped)})"
            if script.skipped
            else ""
        )
    )
    return stop_code
