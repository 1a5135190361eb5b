"""Deploy and drive the TestUSDC token on a local EVM chain (eth-tester or any JSON-RPC
node such as anvil) through web3.py, using the chain's unlocked, funded dev accounts.

Amounts are ints in the token's base units (6 decimals: 1 USDC = 1_000_000).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from eth_utils.address import to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError

TOKEN_DECIMALS = 6


class DevnetTxFailed(RuntimeError):
    """A devnet transaction reverted: the test/dev script asked for something the token
    refuses (e.g. more than the sender's balance)."""


@dataclass(frozen=True, slots=True)
class TokenArtifact:
    abi: list[dict[str, Any]]
    bytecode: str


@functools.cache
def load_test_usdc() -> TokenArtifact:
    """ABI and creation bytecode of TestUSDC, as committed in devnet/contracts/."""
    text = resources.files("escrowd.devnet").joinpath("contracts/TestUSDC.json").read_text()
    raw = json.loads(text)
    return TokenArtifact(abi=raw["abi"], bytecode=raw["bytecode"])


def web3_for_tester(tester: Any) -> Web3:
    """A web3 client over an in-process `eth_tester.EthereumTester`."""
    from web3 import EthereumTesterProvider

    return Web3(EthereumTesterProvider(ethereum_tester=tester))


def web3_for_url(url: str, *, timeout_s: float = 30.0, session: Any | None = None) -> Web3:
    """A web3 client over HTTP; pass a ``requests.Session`` to control its lifetime."""
    return Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout_s}, session=session))


def dev_accounts(w3: Web3) -> list[str]:
    """The node's unlocked, pre-funded accounts (eth-tester: 10, anvil: 10 by default)."""
    return [to_checksum_address(a) for a in w3.eth.accounts]


class TestUSDC:
    """A deployed TestUSDC. Every write returns the 0x tx hash once it is mined."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, w3: Web3, address: str, owner: str) -> None:
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.owner = to_checksum_address(owner)
        self.contract = w3.eth.contract(address=self.address, abi=load_test_usdc().abi)

    def _send(self, fn: Any, sender: str, *, wait: bool, gas: int | None = None) -> str:
        tx: dict[str, Any] = {"from": to_checksum_address(sender)}
        if gas is not None:
            tx["gas"] = gas  # skips eth_estimateGas: bulk senders (benchmarks) save a call
        try:
            tx_hash = fn.transact(tx)
        except ContractLogicError as exc:
            # Raised while estimating gas: the token reverted (custom error in exc.data).
            raise DevnetTxFailed(f"TestUSDC.{fn.fn_name} reverted: {exc.data}") from exc
        if wait:
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
            if receipt["status"] != 1:
                raise DevnetTxFailed(f"transaction {tx_hash.to_0x_hex()} reverted")
        return str(tx_hash.to_0x_hex())

    def mint(self, to: str, amount: int, *, wait: bool = True) -> str:
        fn = self.contract.functions.mint(to_checksum_address(to), amount)
        return self._send(fn, self.owner, wait=wait)

    def transfer(self, sender: str, to: str, amount: int, *, wait: bool = True) -> str:
        fn = self.contract.functions.transfer(to_checksum_address(to), amount)
        return self._send(fn, sender, wait=wait)

    def batch_transfer(
        self,
        sender: str,
        recipients: Sequence[str],
        amounts: Sequence[int],
        *,
        wait: bool = True,
        gas: int | None = None,
    ) -> str:
        """One transaction, one Transfer log per recipient. Without ``wait`` the hash is
        returned at once (anvil automine still mines it); a revert then goes unnoticed."""
        if len(recipients) != len(amounts):
            raise ValueError("recipients and amounts must have the same length")
        fn = self.contract.functions.batchTransfer(
            [to_checksum_address(r) for r in recipients], list(amounts)
        )
        return self._send(fn, sender, wait=wait, gas=gas)

    def balance_of(self, address: str) -> int:
        return int(self.contract.functions.balanceOf(to_checksum_address(address)).call())


def deploy_test_usdc(w3: Web3, owner: str | None = None) -> TestUSDC:
    """Deploy a fresh TestUSDC from ``owner`` (default: the first dev account)."""
    deployer = to_checksum_address(owner or dev_accounts(w3)[0])
    artifact = load_test_usdc()
    factory = w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    tx_hash = factory.constructor().transact({"from": deployer})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
    if receipt["status"] != 1 or not receipt["contractAddress"]:
        raise DevnetTxFailed(f"TestUSDC deployment {tx_hash.to_0x_hex()} failed")
    return TestUSDC(w3, receipt["contractAddress"], deployer)


# --- chain controls (eth-tester provider and anvil both answer these) -------------------


def mine_blocks(w3: Web3, count: int = 1) -> None:
    for _ in range(count):
        _rpc(w3, "evm_mine", [])


def snapshot(w3: Web3) -> str:
    return str(_rpc(w3, "evm_snapshot", []))


def revert(w3: Web3, snapshot_id: str) -> None:
    if not _rpc(w3, "evm_revert", [snapshot_id]):
        raise DevnetTxFailed(f"evm_revert to {snapshot_id} refused")


def anvil_reorg(w3: Web3, depth: int) -> None:
    """Replace the last ``depth`` blocks with new empty ones (anvil only)."""
    _rpc(w3, "anvil_reorg", [depth, []])


def _rpc(w3: Web3, method: str, params: list[Any]) -> Any:
    response = w3.provider.make_request(method, params)  # type: ignore[arg-type]
    if response.get("error"):
        raise DevnetTxFailed(f"{method} failed: {response['error']}")
    return response.get("result")
