"""JsonRpcEvmSource under RPC faults: the fault-injecting proxy (devnet/rpc_proxy.py) sits
in front of anvil and hangs, rate-limits, errors, returns garbage, refuses ranges or lags."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from escrowd.devnet.anvil import free_port
from escrowd.devnet.rpc_proxy import Fault, RpcProxy
from escrowd.indexer.errors import NodeBehind, RangeTooLarge, RpcError, RpcUnavailable
from escrowd.indexer.evm_source import JsonRpcEvmSource, RetryPolicy, classify_rpc_error
from tests.evm_fixtures import EvmChain, anvil_chain

__all__ = ["anvil_chain"]

# The timeout leaves room for a loaded 2-core CI box; a healthy forwarded call takes ~5 ms.
FAST = RetryPolicy(timeout_s=0.75, attempts_per_url=3, backoff_base_s=0.01, backoff_max_s=0.05)
ALCHEMY_RANGE = (
    "Log response size exceeded. You can make eth_getLogs requests with up to a 2K block "
    "range and no limit on the response size. Based on your parameters, this block range "
    "should work: [0x1, 0x5]"
)


# The faults the tests below switch on, by name.
FAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "hang": ("hang", {"hang_s": 5}),
    "429": ("http_status", {"status": 429}),
    "500": ("http_status", {"status": 500}),
    "garbage": ("non_json", {}),
    "truncated": ("truncated", {}),
    "rate_limited": (
        "rpc_error",
        {"code": -32005, "message": "rate limit exceeded, slow down", "whole_request": True},
    ),
    "range": ("range_refusal", {"wording": "infura_plain"}),
    "range_suggest": ("range_refusal", {"wording": "alchemy"}),
    "lag": ("node_behind", {"blocks": 3}),
    "stale_hash": ("other_fork", {"depth": 100, "methods": ["eth_getBlockByNumber"]}),
}


def fault(name: str, *, times: int | None = None) -> Fault:
    kind, options = FAULTS[name]
    return Fault.of(kind, times=times, **options)


@pytest.fixture
def proxies(anvil_chain: EvmChain) -> Iterator[tuple[RpcProxy, RpcProxy]]:
    assert anvil_chain.url is not None
    with RpcProxy([anvil_chain.url]) as first, RpcProxy([anvil_chain.url]) as second:
        yield first, second


@pytest.fixture
def window(anvil_chain: EvmChain) -> tuple[int, int]:
    """A block window whose last block holds a Transfer log."""
    start = anvil_chain.source.head() + 1
    anvil_chain.token.transfer(anvil_chain.accounts[1], anvil_chain.accounts[2], 11)
    anvil_chain.token.transfer(anvil_chain.accounts[1], anvil_chain.accounts[3], 12)
    return start, anvil_chain.source.head()


def _source(*urls: str, policy: RetryPolicy = FAST) -> JsonRpcEvmSource:
    return JsonRpcEvmSource(list(urls), policy=policy, chain="test")


# --- classification (no node needed) ----------------------------------------------------


@pytest.mark.parametrize(
    ("message", "suggested"),
    [
        ("query returned more than 10000 results", None),
        ("block range too large", None),
        ("Log response size exceeded.", None),
        ("eth_getLogs is limited to a 1000 block range", None),
        (ALCHEMY_RANGE, 5),
        ("Query returned more than 10000 results. Try with this block range [0x10, 0x2F].", 47),
    ],
)
def test_provider_range_refusals_are_range_too_large(message: str, suggested: int | None) -> None:
    error = classify_rpc_error({"code": -32005, "message": message})
    assert isinstance(error, RangeTooLarge)
    assert error.suggested_to_block == suggested


def test_other_rpc_errors_are_classified() -> None:
    assert isinstance(
        classify_rpc_error({"code": -32000, "message": "header not found"}), NodeBehind
    )
    wrong = classify_rpc_error({"code": -32602, "message": "invalid argument 0"})
    assert type(wrong) is RpcError and wrong.code == -32602


# --- faults in front of anvil ---------------------------------------------------------


@pytest.mark.anvil
@pytest.mark.parametrize(
    "faults", [["hang"], ["429", "500"], ["garbage"], ["truncated"], ["rate_limited"]]
)
def test_transient_faults_are_retried(
    anvil_chain: EvmChain,
    proxies: tuple[RpcProxy, RpcProxy],
    window: tuple[int, int],
    faults: list[str],
) -> None:
    proxy = proxies[0]
    for name in faults:
        proxy.add(fault(name, times=1))
    started = time.monotonic()
    with _source(proxy.url) as src:
        logs, header = src.logs_with_end_header(anvil_chain.token.address, *window)
    assert [e.amount for e in logs] == [11, 12]
    assert header == anvil_chain.source.block_header(window[1])
    assert proxy.requests == len(faults) + 1
    assert time.monotonic() - started < 5


@pytest.mark.anvil
def test_failover_to_second_url_and_stays_there(
    anvil_chain: EvmChain, proxies: tuple[RpcProxy, RpcProxy], window: tuple[int, int]
) -> None:
    bad, good = proxies
    bad.add(fault("500"))
    with _source(bad.url, good.url) as src:
        logs = src.get_transfer_logs(anvil_chain.token.address, *window)
        assert [e.amount for e in logs] == [11, 12]
        assert bad.requests == FAST.attempts_per_url
        assert src.head() == anvil_chain.source.head()
    assert bad.requests == FAST.attempts_per_url  # the second call went straight to `good`
    assert good.requests == 2


@pytest.mark.anvil
def test_primary_is_tried_again_after_recovery(proxies: tuple[RpcProxy, RpcProxy]) -> None:
    primary, backup = proxies
    down = primary.add(fault("500"))
    policy = RetryPolicy(
        timeout_s=0.75, attempts_per_url=1, backoff_base_s=0.01, primary_retry_after_s=0.0
    )
    with _source(primary.url, backup.url, policy=policy) as src:
        src.head()
        assert (primary.requests, backup.requests) == (1, 1)
        primary.remove(down.id)
        time.sleep(0.01)
        src.head()
    assert (primary.requests, backup.requests) == (2, 1)


@pytest.mark.anvil
def test_dead_endpoint_fails_over(anvil_chain: EvmChain) -> None:
    assert anvil_chain.url is not None
    with _source(f"http://127.0.0.1:{free_port()}", anvil_chain.url) as src:
        assert src.chain_id() == 31337


@pytest.mark.anvil
def test_all_endpoints_failing_is_rpc_unavailable_in_bounded_time(
    proxies: tuple[RpcProxy, RpcProxy],
) -> None:
    first, second = proxies
    first.add(fault("hang"))
    second.add(fault("429"))
    started = time.monotonic()
    with _source(first.url, second.url) as src, pytest.raises(RpcUnavailable) as raised:
        src.head()
    assert not raised.value.timed_out  # the second endpoint answered 429
    # 3 timeouts of 0.75 s, 3 quick 429s and tiny backoffs; below any poll interval.
    assert time.monotonic() - started < 6
    assert (first.requests, second.requests) == (3, 3)


@pytest.mark.anvil
def test_log_query_that_always_times_out_says_so(
    anvil_chain: EvmChain, proxies: tuple[RpcProxy, RpcProxy], window: tuple[int, int]
) -> None:
    """The poller shrinks its window on a timed-out log query (providers that hang)."""
    proxy = proxies[0]
    proxy.add(fault("hang"))
    with _source(proxy.url) as src, pytest.raises(RpcUnavailable) as raised:
        src.get_transfer_logs(anvil_chain.token.address, *window)
    assert raised.value.timed_out


@pytest.mark.anvil
@pytest.mark.parametrize(("name", "suggests"), [("range", False), ("range_suggest", True)])
def test_range_refusal_is_raised_at_once(
    anvil_chain: EvmChain,
    proxies: tuple[RpcProxy, RpcProxy],
    window: tuple[int, int],
    name: str,
    suggests: bool,
) -> None:
    proxy = proxies[0]
    proxy.add(fault(name))
    with _source(proxy.url) as src, pytest.raises(RangeTooLarge) as raised:
        src.logs_with_end_header(anvil_chain.token.address, *window)
    # The proxy accepts one block at a time: a provider's suggestion names that range.
    assert raised.value.suggested_to_block == (window[0] if suggests else None)
    assert proxy.requests == 1  # the caller shrinks the window; retrying it is pointless


@pytest.mark.anvil
def test_lagging_node_is_retried_then_failed_over(
    anvil_chain: EvmChain, proxies: tuple[RpcProxy, RpcProxy], window: tuple[int, int]
) -> None:
    lagging, good = proxies
    lagging.add(fault("lag", times=1))
    with _source(lagging.url) as src:
        logs, header = src.logs_with_end_header(anvil_chain.token.address, *window)
    assert header.number == window[1] and len(logs) == 2
    assert lagging.requests == 2

    lagging.add(fault("lag"))
    with _source(lagging.url, good.url) as src:
        logs, header = src.logs_with_end_header(anvil_chain.token.address, *window)
    assert header == anvil_chain.source.block_header(window[1])
    assert good.requests == 1


@pytest.mark.anvil
@pytest.mark.parametrize("name", ["lag", "stale_hash"])
def test_node_that_stays_behind_raises_node_behind(
    anvil_chain: EvmChain,
    proxies: tuple[RpcProxy, RpcProxy],
    window: tuple[int, int],
    name: str,
) -> None:
    proxy = proxies[0]
    proxy.add(fault(name))
    with _source(proxy.url) as src, pytest.raises(NodeBehind):
        src.logs_with_end_header(anvil_chain.token.address, *window)
    assert proxy.requests == FAST.attempts_per_url


@pytest.mark.anvil
def test_request_errors_are_not_retried(proxies: tuple[RpcProxy, RpcProxy]) -> None:
    proxy = proxies[0]
    with _source(proxy.url) as src, pytest.raises(RpcError) as raised:
        src.call("eth_noSuchMethod", [], lambda result: result)
    assert not isinstance(raised.value, RpcUnavailable | NodeBehind | RangeTooLarge)
    assert proxy.requests == 1
