"""EvmSource behaviour on eth-tester (in-process) and anvil (real JSON-RPC node)."""

from __future__ import annotations

import itertools

import pytest
from eth_account import Account
from web3 import Web3

from escrowd.devnet.evm import deploy_test_usdc
from escrowd.indexer.errors import NodeBehind
from escrowd.indexer.evm_source import EvmSource
from tests.evm_fixtures import INITIAL_TOKEN_BALANCE, EvmChain, anvil_chain, eth_tester_chain

__all__ = ["anvil_chain", "eth_tester_chain"]

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"

CHAINS = [
    pytest.param("eth_tester_chain", id="eth_tester"),
    pytest.param("anvil_chain", id="anvil", marks=pytest.mark.anvil),
]


@pytest.fixture(params=CHAINS)
def chain(request: pytest.FixtureRequest) -> EvmChain:
    value: EvmChain = request.getfixturevalue(request.param)
    return value


def test_source_satisfies_protocol(chain: EvmChain) -> None:
    assert isinstance(chain.source, EvmSource)


def test_mint_transfer_and_batch_logs_are_decoded(chain: EvmChain) -> None:
    token, src = chain.token, chain.source
    alice, bob, carol = chain.accounts[1], chain.accounts[2], chain.accounts[3]
    start = src.head() + 1
    mint_hash = token.mint(bob, 5_000_000)
    transfer_hash = token.transfer(alice, bob, 1_250_000)
    batch_hash = token.batch_transfer(alice, [bob, carol, bob, carol], [1, 2, 0, 3_000_000])
    end = src.head()

    logs = src.get_transfer_logs(token.address, start, end)

    assert [(e.tx_hash, e.from_addr, e.to_addr, e.amount) for e in logs] == [
        (mint_hash, ZERO_ADDRESS, bob, 5_000_000),
        (transfer_hash, alice, bob, 1_250_000),
        (batch_hash, alice, bob, 1),
        (batch_hash, alice, carol, 2),
        (batch_hash, alice, bob, 0),
        (batch_hash, alice, carol, 3_000_000),
    ]
    batch_logs = [e for e in logs if e.tx_hash == batch_hash]
    assert len({e.log_index for e in batch_logs}) == 4
    assert all(e.contract == token.address and not e.removed for e in logs)
    # Addresses come back EIP-55 checksummed, hashes lower-case hex.
    assert all(Web3.is_checksum_address(e.to_addr) for e in logs)
    assert all(e.tx_hash == e.tx_hash.lower() and len(e.tx_hash) == 66 for e in logs)
    for entry in logs:
        assert src.block_header(entry.block_number).hash == entry.block_hash
    assert src.erc20_balance(token.address, carol) == INITIAL_TOKEN_BALANCE + 3_000_002


def test_logs_of_other_contracts_are_not_returned(chain: EvmChain) -> None:
    other = deploy_test_usdc(chain.w3)
    start = chain.source.head() + 1
    other.mint(chain.accounts[2], 7)
    chain.token.mint(chain.accounts[2], 8)

    logs = chain.source.get_transfer_logs(chain.token.address, start, chain.source.head())

    assert [e.amount for e in logs] == [8]


def test_logs_with_end_header_matches_the_chain(chain: EvmChain) -> None:
    src = chain.source
    start = src.head() + 1
    chain.token.transfer(chain.accounts[1], chain.accounts[2], 42)
    chain.token.transfer(chain.accounts[1], chain.accounts[3], 43)
    end = src.head()

    logs, header = src.logs_with_end_header(chain.token.address, start, end)

    assert header == src.block_header(end)
    assert logs == src.get_transfer_logs(chain.token.address, start, end)
    assert [e.amount for e in logs] == [42, 43]
    assert logs[-1].block_number == end and logs[-1].block_hash == header.hash


def test_window_past_the_head_is_node_behind(chain: EvmChain) -> None:
    head = chain.source.head()
    with pytest.raises(NodeBehind):
        chain.source.logs_with_end_header(chain.token.address, head, head + 5)
    with pytest.raises(NodeBehind):
        chain.source.block_header(head + 5)


def test_block_headers_form_a_parent_hash_chain(chain: EvmChain) -> None:
    head = chain.source.head()
    headers = chain.source.block_headers(list(range(head - 3, head + 1)))

    assert [h.number for h in headers] == list(range(head - 3, head + 1))
    for parent, child in itertools.pairwise(headers):
        assert child.parent_hash == parent.hash
        assert child.timestamp >= parent.timestamp


def test_receipt_of_known_and_unknown_transactions(chain: EvmChain) -> None:
    tx_hash = chain.token.transfer(chain.accounts[1], chain.accounts[2], 5)

    receipt = chain.source.receipt(tx_hash)

    assert receipt is not None and receipt.succeeded and receipt.tx_hash == tx_hash
    assert receipt.block_hash == chain.source.block_header(receipt.block_number).hash
    assert chain.source.receipt("0x" + "ab" * 32) is None


def test_signed_payout_path_and_idempotent_rebroadcast(chain: EvmChain) -> None:
    """What the payout sender does: nonce, fees, estimate, sign, send, resend, receipt."""
    src, token = chain.source, chain.token
    payer = Account.create()
    chain.w3.eth.send_transaction(
        {"from": chain.accounts[1], "to": payer.address, "value": Web3.to_wei(1, "ether")}
    )
    token.transfer(chain.accounts[1], payer.address, 2_000_000)
    recipient = chain.accounts[4]
    data = token.contract.encode_abi("transfer", [recipient, 1_500_000])
    call = {"from": payer.address, "to": token.address, "data": data}

    gas = src.estimate_gas(call)
    history = src.fee_history(4, [50])
    # eth_feeHistory shape: one base fee per block plus the next block's.
    assert len(history.base_fee_per_gas_wei) == len(history.gas_used_ratio) + 1 == 5
    assert [len(row) for row in history.reward_wei] == [1, 1, 1, 1]
    tip = src.max_priority_fee_wei()
    max_fee = 2 * history.base_fee_per_gas_wei[-1] + tip
    assert src.gas_price_wei() > 0
    nonce = src.nonce(payer.address)
    signed = payer.sign_transaction(
        {
            "chainId": src.chain_id(),
            "nonce": nonce,
            "to": token.address,
            "data": data,
            "value": 0,
            "gas": gas,
            "maxFeePerGas": max_fee,
            "maxPriorityFeePerGas": tip,
            "type": 2,
        }
    )

    tx_hash = src.send_raw_transaction(bytes(signed.raw_transaction))
    assert tx_hash == "0x" + bytes(signed.hash).hex()
    assert src.send_raw_transaction(bytes(signed.raw_transaction)) == tx_hash

    receipt = src.receipt(tx_hash)
    assert receipt is not None and receipt.succeeded
    assert src.nonce(payer.address) == nonce + 1
    assert src.erc20_balance(token.address, recipient) == INITIAL_TOKEN_BALANCE + 1_500_000
    assert src.erc20_balance(token.address, payer.address) == 500_000
