"""The fault-injecting JSON-RPC proxy itself (devnet/rpc_proxy.py) in front of anvil: what
each fault does to the answers, how ``times`` and predicates bound it, batches, the
control endpoint, and `escrowd devnet proxy` as an operator runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests

from escrowd.devnet.anvil import REPO_ROOT, AnvilProcess
from escrowd.devnet.evm import deploy_test_usdc, dev_accounts, mine_blocks, web3_for_url
from escrowd.devnet.rpc_proxy import Fault, FaultSpecError, RpcProxy, fork_hash
from escrowd.indexer.evm_source import TRANSFER_TOPIC
from tests.evm_fixtures import EvmChain, require_anvil

pytestmark = pytest.mark.anvil


@pytest.fixture(scope="module")
def chain() -> Iterator[EvmChain]:
    require_anvil()
    with AnvilProcess() as anvil, requests.Session() as http:
        w3 = web3_for_url(anvil.url, session=http)
        token = deploy_test_usdc(w3)
        accounts = dev_accounts(w3)
        token.mint(accounts[1], 10**12)
        from escrowd.indexer.evm_source import JsonRpcEvmSource

        with JsonRpcEvmSource([anvil.url], chain="anvil") as source:
            yield EvmChain(source=source, w3=w3, token=token, accounts=accounts, url=anvil.url)


@pytest.fixture
def proxy(chain: EvmChain) -> Iterator[RpcProxy]:
    assert chain.url is not None
    with RpcProxy([chain.url]) as server:
        yield server


def rpc(url: str, method: str, *params: Any) -> Any:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}
    return httpx.post(url, json=body, timeout=5).json()


def batch(url: str, *calls: tuple[str, list[Any]]) -> list[Any]:
    body = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
    answer = httpx.post(url, json=body, timeout=5).json()
    return [item.get("result", item.get("error")) for item in sorted(answer, key=lambda a: a["id"])]


def logs_query(chain: EvmChain, start: int, end: int) -> dict[str, Any]:
    return {
        "address": chain.token.address,
        "fromBlock": hex(start),
        "toBlock": hex(end),
        "topics": [TRANSFER_TOPIC],
    }


def test_head_logs_come_without_the_newest_block_the_given_number_of_times(
    chain: EvmChain, proxy: RpcProxy
) -> None:
    start = chain.source.head() + 1
    chain.token.transfer(chain.accounts[1], chain.accounts[2], 5)
    chain.token.transfer(chain.accounts[1], chain.accounts[3], 6)
    head = chain.source.head()
    fault = proxy.add(Fault.of("head_logs_incomplete", times=2))
    blocks = [
        [int(e["blockNumber"], 16) for e in answer["result"]]
        for answer in (
            rpc(proxy.url, "eth_getLogs", logs_query(chain, start, head)) for _ in range(3)
        )
    ]
    assert blocks == [[head - 1], [head - 1], [head - 1, head]]
    assert fault.fired == 2 and proxy.faults() == []  # exhausted faults are dropped
    # A range that stops below the head is not touched.
    proxy.add(Fault.of("head_logs_incomplete"))
    below = rpc(proxy.url, "eth_getLogs", logs_query(chain, start, head - 1))["result"]
    assert len(below) == 1


def test_node_behind_caps_head_blocks_logs_and_receipts(chain: EvmChain, proxy: RpcProxy) -> None:
    tx = chain.token.transfer(chain.accounts[1], chain.accounts[2], 7)
    mine_blocks(chain.w3, 1)
    head = chain.source.head()
    proxy.add(Fault.of("node_behind", blocks=2))
    answers = batch(
        proxy.url,
        ("eth_blockNumber", []),
        ("eth_getBlockByNumber", [hex(head), False]),
        ("eth_getBlockByNumber", ["latest", False]),
        ("eth_getTransactionReceipt", [tx]),
        ("eth_getLogs", [logs_query(chain, head - 1, head)]),
        ("eth_chainId", []),
    )
    assert int(answers[0], 16) == head - 2
    assert answers[1] is None  # a block above the replica's head
    assert int(answers[2]["number"], 16) == head - 2  # "latest" is the replica's latest
    assert answers[3] is None and answers[4] == []  # the transfer is in block head - 1
    assert int(answers[5], 16) == chain.source.chain_id()  # other calls pass through


def test_other_fork_answers_linked_blocks_with_other_hashes(
    chain: EvmChain, proxy: RpcProxy
) -> None:
    mine_blocks(chain.w3, 3)
    head = chain.source.head()
    proxy.add(Fault.of("other_fork", from_block=head - 1))
    real = chain.source.block_headers([head - 2, head - 1, head])
    answers = batch(
        proxy.url, *[("eth_getBlockByNumber", [hex(n), False]) for n in (head - 2, head - 1, head)]
    )
    assert answers[0]["hash"] == real[0].hash  # below the fork: the same chain
    assert answers[1]["hash"] == fork_hash(real[1].hash) != real[1].hash
    assert answers[1]["parentHash"] == real[0].hash  # the fork hangs off the real chain
    assert answers[2]["parentHash"] == answers[1]["hash"]


def test_http_faults_and_predicates(chain: EvmChain, proxy: RpcProxy) -> None:
    proxy.add(Fault.of("http_status", status=429, retry_after_s=7, times=1))
    limited = httpx.post(proxy.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"})
    assert limited.status_code == 429 and limited.headers["retry-after"] == "7"

    proxy.add(Fault.of("truncated", times=1))
    cut = httpx.post(proxy.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"})
    assert cut.status_code == 200
    with pytest.raises(ValueError):
        cut.json()

    proxy.add(Fault.of("non_json", times=1))
    page = httpx.post(proxy.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"})
    assert page.text.startswith("<html>")

    # A Solana-style fault: an error code for one method, only for some parameters.
    proxy.add(
        Fault.of(
            "rpc_error",
            code=-32004,
            message="Block not available for slot",
            methods=["eth_getBlockByNumber"],
            when=lambda method, params: params[0] == "0x1",
        )
    )
    one, two = batch(
        proxy.url,
        ("eth_getBlockByNumber", ["0x1", False]),
        ("eth_getBlockByNumber", ["0x2", False]),
    )
    assert one == {"code": -32004, "message": "Block not available for slot"}
    assert two["number"] == "0x2"
    proxy.clear()
    assert rpc(proxy.url, "eth_getBlockByNumber", "0x1", False)["result"]["number"] == "0x1"


def test_range_refusal_answers_only_wide_ranges(chain: EvmChain, proxy: RpcProxy) -> None:
    # The module's chain is shared and xdist may run this test first: make room for the range.
    mine_blocks(chain.w3, 6)
    head = chain.source.head()
    proxy.add(Fault.of("range_refusal", wording="infura", max_blocks=3))
    narrow = rpc(proxy.url, "eth_getLogs", logs_query(chain, head - 2, head))
    wide = rpc(proxy.url, "eth_getLogs", logs_query(chain, head - 5, head))
    assert "result" in narrow
    assert wide["error"]["message"] == (
        f"query returned more than 10000 results. Try with this block range "
        f"[{hex(head - 5)}, {hex(head - 3)}]."
    )


def test_bad_fault_specs_are_refused_with_the_reason(proxy: RpcProxy) -> None:
    with pytest.raises(FaultSpecError, match="unknown fault kind 'flood'"):
        Fault.of("flood")
    with pytest.raises(FaultSpecError, match="unknown wording"):
        Fault.of("range_refusal", wording="mystery")
    refused = httpx.post(proxy.control_url + "/faults", json={"kind": "hang", "nap_s": 1})
    assert refused.status_code == 400 and "nap_s" in refused.json()["error"]


def test_devnet_proxy_command_switches_faults_at_run_time(chain: EvmChain) -> None:
    assert chain.url is not None
    # The module's chain is shared: whatever ran before, the head is well above 3.
    mine_blocks(chain.w3, 5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESCROWD_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from escrowd.daemon.cli import main; main()",
            "devnet",
            "proxy",
            "--upstream",
            chain.url,
            "--port",
            "0",
            "--fault",
            '{"kind": "node_behind", "blocks": 3}',
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("rpc proxy: http://127.0.0.1:"), first
        url = first.split()[2]
        head = chain.source.head()
        assert int(rpc(url, "eth_blockNumber")["result"], 16) == head - 3

        added = httpx.post(
            f"{url}/_proxy/faults", json={"kind": "http_status", "status": 503, "times": 1}
        )
        assert added.status_code == 201
        assert (
            httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}).status_code
            == 503
        )
        listed = httpx.get(f"{url}/_proxy/faults").json()
        assert [f["kind"] for f in listed] == ["node_behind"]  # the 503 fired once and left

        assert httpx.delete(f"{url}/_proxy/faults").status_code == 200
        assert int(rpc(url, "eth_blockNumber")["result"], 16) == head
        stats = httpx.get(f"{url}/_proxy/stats").json()
        assert stats["calls"]["eth_blockNumber"] == 2 and stats["requests"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
