"""SolanaRpcSource (the real solana client with failover and retries) against the simulator."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import Message
from solders.system_program import TransferParams, transfer
from solders.transaction import VersionedTransaction
from spl.token.instructions import get_associated_token_address

from escrowd.devnet.solana_faults import FaultRule
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.indexer.errors import (
    BlockNotAvailable,
    HistoryPruned,
    NodeBehind,
    RpcError,
    RpcUnavailable,
    SlotSkipped,
)
from escrowd.indexer.solana_source import SolanaRpcSource, SolanaSource


@pytest.fixture
def sim() -> Iterator[SolanaSimulator]:
    with SolanaSimulator(skip_every_slots=7) as simulator:
        yield simulator


@pytest.fixture
def source(sim: SolanaSimulator) -> Iterator[SolanaRpcSource]:
    with SolanaRpcSource([sim.url], timeout_s=5, max_rounds=2, backoff_base_s=0.01) as src:
        yield src


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_source_reads_typed_history(sim: SolanaSimulator, source: SolanaRpcSource) -> None:
    src: SolanaSource = source
    alice, bob = Keypair(), Keypair()
    sim.airdrop(alice.pubkey(), 10**9)
    usdc = sim.create_usdc_mint()
    sim.mint_to(usdc, alice.pubkey(), 3_000_000)
    sig = sim.transfer_token(alice, usdc, bob.pubkey(), 2_500_000)
    sim.finalize_all()
    bob_ata = str(get_associated_token_address(bob.pubkey(), usdc))

    tx = src.get_transaction(str(sig))
    assert tx is not None and tx.succeeded and tx.fee_lamports == 5000
    received = [b for b in tx.post_token_balances if b.owner == str(bob.pubkey())]
    assert received[0].amount_base_units == 2_500_000 and received[0].mint == str(usdc)
    assert tx.account_keys[received[0].account_index] == bob_ata
    assert src.get_signatures_for_address(bob_ata)[0].signature == str(sig)
    assert str(sig) not in [s.signature for s in src.get_signatures_for_address(str(bob.pubkey()))]

    slot = src.get_slot()
    assert src.get_slot("processed") > slot
    assert src.get_block_height("processed") > src.get_block_height()
    slots = src.get_blocks(0, slot)
    assert tx.slot in slots and all(s % 7 for s in slots if s)
    block = src.get_block(tx.slot)
    assert str(sig) in [t.signature for t in block.transactions]
    assert src.get_block(block.parent_slot).blockhash == block.previous_blockhash

    accounts = src.get_token_accounts_by_owner(str(bob.pubkey()), mint=str(usdc))
    assert [(a.address, a.amount_base_units, a.decimals) for a in accounts] == [
        (bob_ata, 2_500_000, 6)
    ]
    # Alice paid one fee (her transfer); the faucet paid for Bob's token account.
    assert src.get_balance(str(alice.pubkey())) == 10**9 - 5000
    assert src.get_minimum_balance_for_rent_exemption(165) == 2039280
    unknown = str(Keypair().sign_message(b"never sent"))
    statuses = src.get_signature_statuses([str(sig), unknown])
    assert statuses[0] is not None and statuses[0].confirmation_status == "finalized"
    assert statuses[0].slot == tx.slot and statuses[0].err is None
    assert statuses[1] is None


def test_send_raw_transaction_and_rejection(sim: SolanaSimulator, source: SolanaRpcSource) -> None:
    payer = Keypair()
    sim.airdrop(payer.pubkey(), 10**9)
    latest = source.get_latest_blockhash("confirmed")
    sim.advance_slots(2)
    blockhash = Hash.from_string(latest.blockhash)
    ix = transfer(
        TransferParams(from_pubkey=payer.pubkey(), to_pubkey=Keypair().pubkey(), lamports=10**7)
    )
    raw = bytes(
        VersionedTransaction(Message.new_with_blockhash([ix], payer.pubkey(), blockhash), [payer])
    )
    sig = source.send_raw_transaction(raw)
    assert sig == str(VersionedTransaction.from_bytes(raw).signatures[0])
    too_much = transfer(
        TransferParams(from_pubkey=payer.pubkey(), to_pubkey=Keypair().pubkey(), lamports=10**12)
    )
    bad = bytes(
        VersionedTransaction(
            Message.new_with_blockhash([too_much], payer.pubkey(), blockhash), [payer]
        )
    )
    with pytest.raises(RpcError) as info:
        source.send_raw_transaction(bad)
    assert info.value.code == -32002 and not isinstance(info.value, RpcUnavailable)


def test_skipped_and_unavailable_slots_are_typed(
    sim: SolanaSimulator, source: SolanaRpcSource
) -> None:
    sim.advance_slots(50)
    with pytest.raises(SlotSkipped) as skipped:
        source.get_block(14)
    assert skipped.value.code == -32007
    with pytest.raises(BlockNotAvailable) as missing:
        source.get_block(45)
    assert missing.value.code == -32004
    assert source.get_block(45, "confirmed").slot == 45


def test_failover_from_dead_url(sim: SolanaSimulator) -> None:
    with SolanaRpcSource([dead_url(), sim.url], timeout_s=2, max_rounds=1) as src:
        assert src.get_slot("processed") == 1
        # The URL that worked is tried first from now on.
        assert src.urls[src._preferred] == sim.url


def test_all_urls_dead_is_rpc_unavailable() -> None:
    with (
        SolanaRpcSource([dead_url()], timeout_s=1, max_rounds=2, backoff_base_s=0.01) as src,
        pytest.raises(RpcUnavailable, match="getSlot failed"),
    ):
        src.get_slot()


def test_retries_after_429(sim: SolanaSimulator) -> None:
    sim.faults.add(FaultRule("http_429", count=2, retry_after_s=0))
    with SolanaRpcSource([sim.url], timeout_s=5, max_rounds=3, backoff_base_s=0.01) as src:
        assert src.get_slot("processed") == 1
        assert src.calls["getSlot"] == 3
    sim.faults.add(FaultRule("http_429", count=10, retry_after_s=0))
    with (
        SolanaRpcSource([sim.url], timeout_s=5, max_rounds=3, backoff_base_s=0.01) as src,
        pytest.raises(RpcUnavailable, match="HTTP 429"),
    ):
        src.get_slot()
    assert src.calls["getSlot"] == 3


def test_each_node_error_code_is_treated_by_its_meaning(sim: SolanaSimulator) -> None:
    sim.advance_slots(40)
    with SolanaRpcSource(
        [sim.url, sim.url], timeout_s=5, max_rounds=2, backoff_base_s=0.01
    ) as two_urls:
        # Not available on one endpoint: the other is asked before giving up.
        sim.faults.add(FaultRule("error", methods=frozenset({"getBlock"}), code=-32004, count=1))
        assert two_urls.get_block(5).slot == 5
        sim.faults.add(FaultRule("error", methods=frozenset({"getBlock"}), code=-32001))
        with pytest.raises(HistoryPruned) as pruned:
            two_urls.get_block(5)
        assert pruned.value.code == -32001
        assert two_urls.calls["getBlock"] == 4
        sim.faults.clear()
        # Behind the asked context slot everywhere: NodeBehind, not a plain outage.
        with pytest.raises(NodeBehind, match="-32016"):
            two_urls.get_slot("confirmed", min_context_slot=10**6)
        sim.faults.add(FaultRule("error", methods=frozenset({"getBlock"}), code=-32009, count=1))
        with pytest.raises(SlotSkipped) as storage_gap:
            two_urls.get_block(5)
        assert storage_gap.value.code == -32009


def test_retry_after_of_a_429_is_waited(sim: SolanaSimulator) -> None:
    sim.faults.add(FaultRule("http_429", count=1, retry_after_s=1))
    with SolanaRpcSource([sim.url], timeout_s=5, max_rounds=2, backoff_base_s=0.01) as src:
        started = time.monotonic()
        assert src.get_slot("processed") == 1
        assert time.monotonic() - started >= 1.0
        assert src.calls["getSlot"] == 2
