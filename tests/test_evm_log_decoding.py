"""escrowd decodes Transfer logs itself (hex parsing, EIP-55 with safe-pysha3's keccak)
rather than through eth_utils; what it reads must be what web3 reads from the same logs."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_utils.address import to_checksum_address

from escrowd.indexer.evm_source import TRANSFER_TOPIC, decode_transfer_log
from tests.evm_fixtures import EvmChain


def test_transfer_logs_decode_as_web3_decodes_them(anvil_chain: EvmChain) -> None:
    chain = anvil_chain
    recipients = [Account.create().address for _ in range(40)]
    amounts = [1 + 7**i % 10**6 for i in range(40)]
    amounts[0] = 2**255  # far past 64 bits: the whole uint256 must survive
    chain.token.mint(recipients[0], amounts[0])
    chain.token.batch_transfer(chain.accounts[1], recipients[1:], amounts[1:])
    raw_logs = chain.w3.eth.get_logs(
        {"fromBlock": 0, "toBlock": "latest", "address": chain.token.address}
    )
    event = chain.token.contract.events.Transfer()
    received: dict[str, int] = {}
    for raw in raw_logs:
        web3_log = event.process_log(raw)
        ours = decode_transfer_log(
            {
                "topics": ["0x" + t.hex().removeprefix("0x") for t in raw["topics"]],
                "data": "0x" + raw["data"].hex().removeprefix("0x"),
                "blockHash": "0x" + raw["blockHash"].hex().removeprefix("0x"),
                "transactionHash": "0x" + raw["transactionHash"].hex().removeprefix("0x"),
                "blockNumber": hex(raw["blockNumber"]),
                "logIndex": hex(raw["logIndex"]),
                "address": raw["address"],
            }
        )
        assert ours is not None
        args = web3_log["args"]
        sender, to, value = (args[name] for name in ("from", "to", "value"))
        assert (ours.from_addr, ours.to_addr, ours.amount) == (sender, to, value)
        assert ours.contract == chain.token.address
        assert ours.block_number == raw["blockNumber"]
        assert ours.log_index == raw["logIndex"]
        received[ours.to_addr] = received.get(ours.to_addr, 0) + ours.amount
    # The fixture's funding transfers come first; ours are all there, whole.
    assert {r: received[r] for r in recipients} == dict(zip(recipients, amounts, strict=True))
    assert {"0x" + t.hex().removeprefix("0x") for t in raw_logs[0]["topics"][:1]} == {
        TRANSFER_TOPIC
    }


@pytest.mark.parametrize("seed", range(3))
def test_addresses_are_checksummed_as_eip55_says(seed: int) -> None:
    for n in range(300):
        address = "0x" + f"{(seed * 300 + n) * 0x9E3779B97F4A7C15 % 2**160:040x}"
        topic = "0x" + "00" * 12 + address[2:]
        log = decode_transfer_log(
            {
                "topics": [TRANSFER_TOPIC, topic, topic.upper().replace("0X", "0x")],
                "data": "0x" + "00" * 31 + "01",
                "blockHash": "0x" + "11" * 32,
                "transactionHash": "0x" + "22" * 32,
                "blockNumber": "0x1",
                "logIndex": "0x0",
                "address": address.upper().replace("0X", "0x"),
            }
        )
        assert log is not None
        assert log.from_addr == log.to_addr == log.contract == to_checksum_address(address)


def test_a_malformed_address_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_transfer_log(
            {
                "topics": [TRANSFER_TOPIC, "0x" + "00" * 12 + "zz" * 20, "0x" + "00" * 32],
                "data": "0x" + "00" * 32,
                "blockHash": "0x" + "11" * 32,
                "transactionHash": "0x" + "22" * 32,
                "blockNumber": "0x1",
                "logIndex": "0x0",
                "address": "0x" + "33" * 20,
            }
        )
