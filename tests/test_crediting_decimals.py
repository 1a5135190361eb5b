"""Two anvil chains in one ledger: USDC with 6 decimals on "base" and with 18 on "bsc" (a
token the tests deploy and configure with 18 decimals, as USDC on BNB Chain has). Every
deposit is credited at the ledger's one USDC scale, payouts go back out at each chain's
own, and amounts of any size a uint256 carries are stored or refused visibly, never by
stalling the chain's cursor."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from eth_account import Account
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker
from web3.types import Wei

from escrowd.config.settings import EvmChainSettings, SettingsError, load_settings
from escrowd.devnet.anvil import AnvilProcess
from escrowd.devnet.evm import TestUSDC, deploy_test_usdc, dev_accounts, mine_blocks, web3_for_url
from escrowd.escrow import accounts, audit, ledger, service
from escrowd.escrow.deposits import DEPOSITS_UNCREDITED, LedgerDepositSink
from escrowd.escrow.errors import InsufficientFunds
from escrowd.escrow.money import parse_amount
from escrowd.escrow.payout_worker import EvmPayoutChain, PayoutWorker, WorkerOptions
from escrowd.escrow.payouts import PlatformAddresses
from escrowd.indexer.evm_poller import EvmPoller
from escrowd.indexer.evm_sender import EvmSender
from escrowd.indexer.evm_source import JsonRpcEvmSource, RetryPolicy
from escrowd.models import (
    Agent,
    AuditLog,
    Chain,
    Deposit,
    DepositAddress,
    LedgerTransfer,
    TransferCode,
    WebhookEvent,
)
from escrowd.models.db import make_engine, make_session_factory
from escrowd.models.registry import AssetRegistryConflict, ensure_asset
from escrowd.wallets.keystore import UnlockedKeystore, create_keystore
from escrowd.wallets.secrets import Secret
from tests.evm_fixtures import require_anvil

pytestmark = pytest.mark.anvil

USDC_18 = 10**18
POLICY = RetryPolicy(timeout_s=5.0, attempts_per_url=3, backoff_base_s=0.05)


@dataclass
class Net:
    """One anvil chain with its token, as escrowd is configured for it."""

    settings: EvmChainSettings
    source: JsonRpcEvmSource
    token: TestUSDC
    holder: str


@pytest.fixture(scope="module")
def nets() -> Iterator[dict[str, Net]]:
    require_anvil()
    with (
        AnvilProcess(chain_id=8453) as base_node,
        AnvilProcess(chain_id=56) as bsc_node,
        requests.Session() as http,
    ):
        out = {}
        for name, node, decimals in (("base", base_node, 6), ("bsc", bsc_node, 18)):
            w3 = web3_for_url(node.url, session=http)
            token = deploy_test_usdc(w3)
            holder = dev_accounts(w3)[1]
            token.mint(holder, 10**9 * 10**decimals)
            settings = EvmChainSettings(
                name=name,
                chain_id=node.chain_id,
                rpc_urls=[node.url],
                usdc_address=token.address,
                usdc_decimals=decimals,
                confirmations=1,
                max_reorg_depth=4,
            )
            source = JsonRpcEvmSource([node.url], policy=POLICY, chain=name)
            out[name] = Net(settings, source, token, holder)
        yield out
        for net in out.values():
            net.source.close()


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


def _agent(sessions: sessionmaker[Session], name: str) -> tuple[int, str]:
    """An agent with its one EVM deposit address (it receives on every EVM chain)."""
    address = Account.create().address
    with sessions() as s, s.begin():
        agent = Agent(external_id=name)
        s.add(agent)
        s.flush()
        index = int(s.scalar(select(DepositAddress.id).order_by(DepositAddress.id.desc())) or 0)
        s.add(
            DepositAddress(
                agent_id=agent.id, chain=Chain.EVM, address=address, derivation_index=index + 1
            )
        )
        return agent.id, address


def _credit_all(net: Net, sessions: sessionmaker[Session]) -> EvmPoller:
    """Scan the chain to its head and credit what is deep enough."""
    mine_blocks(net.token.w3, net.settings.confirmations)
    poller = EvmPoller(net.settings, net.source, sessions, LedgerDepositSink())
    for _ in range(10):
        result = poller.poll_once()
        assert result.error is None, result.error
        if result.done:
            break
    poller.confirm_once()
    return poller


def _available(sessions: sessionmaker[Session], agent_id: int) -> int:
    with sessions() as s:
        return ledger.balance(s, accounts.agent_available(s, agent_id, "USDC"))


def _books_clean(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        assert ledger.check(s) == []
        report = audit.verify(s)
        assert report.ok, report.first_problem


def _keystore(tmp_path: Path, nets: dict[str, Net]) -> UnlockedKeystore:
    keystore = create_keystore(tmp_path / "keystore.json", Secret("crediting"), scrypt_log2_n=10)
    hot = keystore.evm_hot_wallet.address
    for net in nets.values():
        net.token.w3.eth.send_transaction(
            {"from": dev_accounts(net.token.w3)[0], "to": hot, "value": Wei(10**18)}
        )
    return keystore


def _pay_out(net: Net, sessions: sessionmaker[Session], keystore: UnlockedKeystore) -> None:
    sender = EvmSender(
        net.source,
        keystore.evm_hot_wallet,
        chain=net.settings.name,
        chain_id=net.settings.chain_id,
        max_fee_gwei=200,
        confirmations=1,
    )
    worker = PayoutWorker(sessions, EvmPayoutChain(sender), WorkerOptions(worker_id="w"))
    stats = worker.run_until_idle()
    assert stats.confirmed >= 1 and stats.failed == 0


def test_one_usdc_in_on_the_18_decimal_chain_is_one_usdc_out_anywhere(
    nets: dict[str, Net], sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    base, bsc = nets["base"], nets["bsc"]
    alice, address = _agent(sessions, "alice")
    bsc.token.transfer(bsc.holder, address, USDC_18)  # 1 USDC on the 18-decimal chain
    base.token.transfer(base.holder, address, 2_000_000)  # 2 USDC on the 6-decimal one
    _credit_all(bsc, sessions)
    _credit_all(base, sessions)
    assert _available(sessions, alice) == 3_000_000  # 3 USDC at the ledger's 6 decimals

    keystore = _keystore(tmp_path, nets)
    platform = PlatformAddresses.of_keystore(keystore, None)
    out_base, out_bsc = Account.create().address, Account.create().address

    def withdraw(chain: str, amount: str, key: str, to: str) -> None:
        with sessions() as s, s.begin():
            service.withdraw(
                s,
                agent=service.get_agent(s, "alice"),
                asset="USDC",
                chain=chain,
                family="evm",
                to_address=to,
                amount=parse_amount(amount, service.asset_decimals(s, "USDC")),
                idempotency_key=key,
                min_amount_base_units=1,
                platform=platform,
            )

    # The case that paid out 500 USDC on base for 1 USDC deposited on the 18-decimal chain.
    with pytest.raises(InsufficientFunds):
        withdraw("base", "500", "w-500", out_base)
    withdraw("base", "1.5", "w-base", out_base)
    withdraw("bsc", "1.5", "w-bsc", out_bsc)
    with pytest.raises(InsufficientFunds):
        withdraw("bsc", "0.000001", "w-more", out_bsc)
    # The hot wallets hold the float the payouts draw on (deposits are swept there).
    base.token.mint(keystore.evm_hot_wallet.address, 2_000_000)
    bsc.token.mint(keystore.evm_hot_wallet.address, 2 * USDC_18)
    _pay_out(base, sessions, keystore)
    _pay_out(bsc, sessions, keystore)
    # Each chain pays in its own token's units: 1.5 USDC each, 3 USDC in all, as deposited.
    assert base.token.balance_of(out_base) == 1_500_000
    assert bsc.token.balance_of(out_bsc) == 1_500_000 * 10**12
    assert _available(sessions, alice) == 0
    _books_clean(sessions)


def test_large_dust_and_refused_amounts_are_recorded_and_the_cursor_moves_on(
    nets: dict[str, Net], sessions: sessionmaker[Session]
) -> None:
    bsc = nets["bsc"]
    bob, address = _agent(sessions, "bob")
    refused_before = DEPOSITS_UNCREDITED.labels("bsc", "refused")._value.get()
    huge = 2**200
    bsc.token.mint(bsc.holder, huge)
    amounts = [10 * USDC_18, USDC_18 + 1, 10**11, huge]
    for amount in amounts:
        bsc.token.transfer(bsc.holder, address, amount)
    mine_blocks(bsc.token.w3, 2)
    bsc.token.transfer(bsc.holder, address, 2 * USDC_18)  # a later deposit, blocks later
    poller = _credit_all(bsc, sessions)
    assert poller.poll_once().done

    with sessions() as s:
        rows = s.scalars(
            select(Deposit).where(Deposit.agent_id == bob).order_by(Deposit.block_number)
        ).all()
        got = [
            (d.amount, d.status, d.credit_state, d.credited_base_units, d.dust_base_units)
            for d in rows
        ]
        notes = [d.credit_note for d in rows]
        actions = s.scalars(
            select(AuditLog.action).where(AuditLog.stream.like("deposit:bsc:%"))
        ).all()
        confirmed = [
            json.loads(e.payload)["data"]
            for e in s.scalars(select(WebhookEvent).where(WebhookEvent.type == "deposit.confirmed"))
        ]
    assert got == [
        (10 * USDC_18, "confirmed", "credited", 10_000_000, 0),
        (USDC_18 + 1, "confirmed", "credited", 1_000_000, 1),
        (10**11, "confirmed", "dust", 0, 10**11),
        (huge, "confirmed", "refused", 0, 0),
        (2 * USDC_18, "confirmed", "credited", 2_000_000, 0),
    ]
    assert notes[1] is not None and "held on chain" in notes[1]
    assert notes[3] is not None and "largest ledger amount" in notes[3]
    assert sorted(set(actions)) == ["deposit_dust", "deposit_refused", "ledger_deposit"]
    mine = [e for e in confirmed if e["agent"] == "bob"]
    assert [e["credit_state"] for e in mine] == [
        "credited",
        "credited",
        "dust",
        "refused",
        "credited",
    ]
    assert mine[3]["amount_base_units"] == str(huge) and mine[3]["decimals"] == 18
    assert DEPOSITS_UNCREDITED.labels("bsc", "refused")._value.get() == refused_before + 1
    assert _available(sessions, bob) == 13_000_000
    _books_clean(sessions)


def test_ledger_check_catches_a_credit_at_the_token_scale(
    nets: dict[str, Net], sessions: sessionmaker[Session]
) -> None:
    bsc = nets["bsc"]
    carol, address = _agent(sessions, "carol")
    bsc.token.transfer(bsc.holder, address, USDC_18)
    _credit_all(bsc, sessions)
    _books_clean(sessions)
    with sessions() as s, s.begin():
        deposit = s.scalars(select(Deposit).where(Deposit.agent_id == carol)).one()
        # What crediting the raw token units did before: 10^18 micro-USDC for 1 USDC.
        ledger.post(
            s,
            [
                ledger.TransferSpec(
                    f"deposit:bsc:{deposit.id}:raw",
                    accounts.custody(s, "bsc", "USDC").id,
                    accounts.agent_available(s, carol, "USDC").id,
                    USDC_18 - 1_000_000,
                    TransferCode.DEPOSIT,
                    "deposit",
                    str(deposit.id),
                )
            ],
            actor="test",
        )
        s.execute(
            update(Deposit).where(Deposit.id == deposit.id).values(credited_base_units=USDC_18)
        )
        s.execute(text("UPDATE assets SET decimals = 2 WHERE chain = 'bsc'"))
    with sessions() as s:
        found = {v.check: v.message for v in ledger.check(s)}
        raw = s.scalar(
            select(LedgerTransfer.amount).where(LedgerTransfer.idempotency_key.like("%:raw"))
        )
    assert raw == USDC_18 - 1_000_000
    assert "deposit_scale" in found and "at the ledger's scale of 6" in found["deposit_scale"]
    assert "asset_scale" in found and "bsc" in found["asset_scale"]


def test_a_chain_whose_token_is_coarser_than_the_ledger_is_refused_at_start(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    config = tmp_path / "escrowd.toml"
    config.write_text(
        "[[evm_chains]]\n"
        'name = "coarse"\nchain_id = 1\nrpc_urls = ["http://127.0.0.1:1"]\n'
        f'usdc_address = "0x{"11" * 20}"\nusdc_decimals = 2\n'
    )
    with pytest.raises(
        SettingsError, match=r"evm_chains\.0\.usdc_decimals: .*ledger's USDC scale of 6"
    ):
        load_settings(config, environ={})
    with sessions() as s, pytest.raises(AssetRegistryConflict, match="coarser"):
        ensure_asset(s, chain="coarse", symbol="USDC", decimals=2, token_address=None)
