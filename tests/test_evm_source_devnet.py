"""Devnet chain controls the indexer's reorg tests rely on, and the anvil process lifecycle."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from escrowd.devnet.anvil import AnvilError, AnvilProcess, find_anvil
from escrowd.devnet.evm import DevnetTxFailed, anvil_reorg, mine_blocks
from escrowd.indexer.evm_source import EthTesterSource
from tests.evm_fixtures import EvmChain, anvil_chain, eth_tester_chain, require_anvil

__all__ = ["anvil_chain", "eth_tester_chain"]


def test_eth_tester_revert_replaces_blocks_and_drops_their_logs(eth_tester_chain: EvmChain) -> None:
    chain = eth_tester_chain
    assert isinstance(chain.source, EthTesterSource)
    src = chain.source
    snapshot_id = src.snapshot()
    tx_hash = chain.token.transfer(chain.accounts[1], chain.accounts[2], 77)
    block = src.head()
    old_hash = src.block_header(block).hash

    src.revert(snapshot_id)
    new_hashes = src.mine_blocks(2)

    assert src.head() == block + 1
    assert src.block_header(block).hash == new_hashes[0] != old_hash
    assert src.get_transfer_logs(chain.token.address, block, block) == []
    assert src.receipt(tx_hash) is None


@pytest.mark.anvil
def test_anvil_reorg_replaces_blocks_and_drops_their_logs(anvil_chain: EvmChain) -> None:
    src = anvil_chain.source
    tx_hash = anvil_chain.token.transfer(anvil_chain.accounts[1], anvil_chain.accounts[2], 77)
    mine_blocks(anvil_chain.w3, 2)
    head = src.head()
    logs, old_end = src.logs_with_end_header(anvil_chain.token.address, head - 2, head)
    assert [e.amount for e in logs] == [77]

    anvil_reorg(anvil_chain.w3, 3)

    logs, new_end = src.logs_with_end_header(anvil_chain.token.address, head - 2, head)
    assert logs == []
    assert new_end.number == head and new_end.hash != old_end.hash
    assert src.receipt(tx_hash) is None


@pytest.mark.anvil
def test_token_refuses_overdraft(anvil_chain: EvmChain) -> None:
    with pytest.raises(DevnetTxFailed):
        anvil_chain.token.transfer(anvil_chain.accounts[5], anvil_chain.accounts[6], 10**30)


@pytest.mark.anvil
def test_anvil_process_is_stopped_when_the_body_raises() -> None:
    require_anvil()
    process = AnvilProcess(chain_id=4242)
    with pytest.raises(RuntimeError, match="test failure"), process:
        reply = httpx.post(
            process.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
        )
        assert int(reply.json()["result"], 16) == 4242
        pid, url = process._proc.pid if process._proc else -1, process.url
        raise RuntimeError("test failure")
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json={}, timeout=1)
    deadline = time.monotonic() + 5
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_missing_anvil_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.setenv("ESCROWD_ANVIL", os.path.join(tmp_path, "no-anvil"))
    assert find_anvil() is None
    with pytest.raises(AnvilError, match="npm ci"):
        AnvilProcess().start()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="anvil not found"):
        require_anvil()
