"""Where the EVM indexer and the payout sender read the chain: the `EvmSource` protocol
and its two implementations.

- `JsonRpcEvmSource`: plain JSON-RPC 2.0 over httpx (batched arrays, no web3 middleware
  in the hot path), with failover across URLs, bounded retries with backoff and jitter,
  and typed errors (`indexer.errors`).
- `EthTesterSource`: in-process over `eth_tester.EthereumTester` (py-evm) for fast tests
  and `escrowd dev`, with mining / snapshot helpers.

Conventions: addresses are returned EIP-55 checksummed (store them that way); block and
transaction hashes are ``0x``-prefixed lower-case hex; amounts are ints in base units.
"""

from __future__ import annotations

import email.utils
import functools
import json
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import httpx
import structlog
from sha3 import keccak_256  # type: ignore[import-untyped]  # safe-pysha3 ships no types

from escrowd.config.settings import EvmChainSettings
from escrowd.indexer.errors import NodeBehind, RangeTooLarge, RpcError, RpcUnavailable

log = structlog.get_logger(__name__)

# keccak("Transfer(address,address,uint256)")
TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BlockHeader:
    number: int
    hash: str
    parent_hash: str
    timestamp: int


class TransferLog(NamedTuple):
    """One ERC-20 ``Transfer`` event. ``amount`` is in the token's base units. A named
    tuple: a backfill decodes tens of thousands per window."""

    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    from_addr: str
    to_addr: str
    amount: int
    removed: bool
    contract: str


@dataclass(frozen=True, slots=True)
class TxReceipt:
    tx_hash: str
    block_number: int
    block_hash: str
    succeeded: bool
    gas_used: int
    effective_gas_price_wei: int


@dataclass(frozen=True, slots=True)
class FeeHistory:
    oldest_block: int
    base_fee_per_gas_wei: list[int]
    gas_used_ratio: list[float]
    reward_wei: list[list[int]]


@runtime_checkable
class EvmSource(Protocol):
    """Read (and broadcast to) one EVM chain. Implementations raise `indexer.errors`."""

    def chain_id(self) -> int: ...

    def head(self) -> int:
        """Latest block number."""
        ...

    def block_header(self, number: int) -> BlockHeader:
        """Raises `NodeBehind` when the node does not have the block yet."""
        ...

    def block_headers(self, numbers: Sequence[int]) -> list[BlockHeader]:
        """Headers in the order asked; `NodeBehind` if any is missing."""
        ...

    def head_with_headers(self, numbers: Sequence[int]) -> tuple[int, list[BlockHeader | None]]:
        """The latest block number and the headers asked for, read from one node in one
        request; None for a block that node does not have."""
        ...

    def get_transfer_logs(self, contract: str, from_block: int, to_block: int) -> list[TransferLog]:
        """Transfer logs of ``contract`` in [from_block, to_block], in chain order."""
        ...

    def logs_with_end_header(
        self, contract: str, from_block: int, to_block: int
    ) -> tuple[list[TransferLog], BlockHeader]:
        """Logs of the window and the header of ``to_block``, read from one node in one
        request. `NodeBehind` if the end block is missing or its logs disagree with it."""
        ...

    def transfers_to(
        self, addresses: Sequence[str], from_block: int, to_block: int
    ) -> tuple[list[TransferLog], BlockHeader]:
        """ERC-20 Transfer logs of any contract whose recipient is one of ``addresses`` in
        [from_block, to_block], and the header of ``to_block``, from one node in one request
        (a topic filter on the recipient). `NodeBehind` as for `logs_with_end_header`."""
        ...

    def receipt(self, tx_hash: str) -> TxReceipt | None:
        """None while the transaction is unknown or pending."""
        ...

    def send_raw_transaction(self, raw_tx: bytes) -> str:
        """Broadcast signed bytes; returns the tx hash. Re-sending a known transaction
        is not an error (rebroadcast after a crash)."""
        ...

    def nonce(self, address: str, *, pending: bool = True) -> int: ...

    def gas_price_wei(self) -> int: ...

    def max_priority_fee_wei(self) -> int: ...

    def fee_history(
        self, block_count: int, reward_percentiles: Sequence[float] = ()
    ) -> FeeHistory: ...

    def estimate_gas(self, tx: Mapping[str, Any]) -> int:
        """``tx`` uses JSON-RPC field names and hex quantities (``from``, ``to``,
        ``data``, ``value``)."""
        ...

    def native_balance_wei(self, address: str) -> int: ...

    def erc20_balance(self, contract: str, address: str) -> int: ...


# --- decoding helpers shared by both implementations ---------------------------------


_HEX40 = re.compile(r"[0-9a-f]{40}")


def keccak(data: bytes) -> bytes:
    digest: bytes = keccak_256(data).digest()
    return digest


@functools.lru_cache(maxsize=1 << 16)
def _checksum(address: str) -> str:
    """EIP-55 form of a 0x-prefixed hex address. Written here rather than taken from
    eth_utils, whose import cost every `escrowd backfill` start ~0.3 s."""
    digits = address[2:].lower() if address[:2] in ("0x", "0X") else ""
    if not _HEX40.fullmatch(digits):
        raise ValueError(f"not a 20-byte hex address: {address!r}")
    digest: str = keccak_256(digits.encode("ascii")).hexdigest()
    return "0x" + "".join(
        c.upper() if h in "89abcdef" else c for c, h in zip(digits, digest, strict=False)
    )


def _hex_to_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ValueError(f"not a hex quantity: {value!r}")
    return int(value, 16)


def _hash32(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 66 or not value.startswith("0x"):
        raise ValueError(f"not a 32-byte hash: {value!r}")
    return value.lower()


def decode_transfer_log(raw: Mapping[str, Any]) -> TransferLog | None:
    """Decode a JSON-RPC log object; None when it is not an ERC-20 Transfer (e.g. an
    ERC-721 Transfer, which has the tokenId as a fourth topic and no data).

    This runs once per log in a backfill, so it is written for speed: positional
    construction, cached checksumming, and only the checks that catch garbage.
    """
    topics = raw["topics"]
    if len(topics) != 3 or topics[0].lower() != TRANSFER_TOPIC:
        return None
    data = raw["data"]
    if not isinstance(data, str) or len(data) != 66:
        return None
    from_topic, to_topic = topics[1], topics[2]
    block_hash, tx_hash = raw["blockHash"], raw["transactionHash"]
    if len(from_topic) != 66 or len(to_topic) != 66 or len(block_hash) != 66 or len(tx_hash) != 66:
        raise ValueError(f"malformed Transfer log: {raw!r}")
    return TransferLog(
        int(raw["blockNumber"], 16),
        block_hash.lower(),
        tx_hash.lower(),
        int(raw["logIndex"], 16),
        _checksum("0x" + from_topic[26:]),
        _checksum("0x" + to_topic[26:]),
        int(data, 16),
        bool(raw.get("removed", False)),
        _checksum(raw["address"]),
    )


def _decode_header(raw: Any, number: int) -> BlockHeader:
    if raw is None:
        raise NodeBehind(f"node does not have block {number} yet; retry later")
    header = BlockHeader(
        number=_hex_to_int(raw["number"]),
        hash=_hash32(raw["hash"]),
        parent_hash=_hash32(raw["parentHash"]),
        timestamp=_hex_to_int(raw["timestamp"]),
    )
    if header.number != number:
        raise ValueError(f"asked for block {number}, node answered block {header.number}")
    return header


def _check_window(
    logs: list[TransferLog], from_block: int, to_block: int, end: BlockHeader
) -> None:
    for entry in logs:
        if not from_block <= entry.block_number <= to_block:
            raise ValueError(
                f"log in block {entry.block_number} outside [{from_block}, {to_block}]"
            )
        if entry.block_number == to_block and entry.block_hash != end.hash:
            raise NodeBehind(
                f"logs of block {to_block} carry hash {entry.block_hash} but the node's "
                f"header says {end.hash} (reorg or lagging replica); retry later"
            )


# --- error classification -------------------------------------------------------------

_RANGE_PHRASES = (
    "query returned more than",
    "block range too large",
    "block range is too large",
    "log response size exceeded",
    "response size exceeded",
    "limited to a",
    "exceed maximum block range",
    "range should work",
    "too many results",
    "query timeout exceeded",
    "block range is too wide",
    "range is too large",
    "maximum block range",
    "ranges over",
    "block range greater than",
)
_BEHIND_PHRASES = ("header not found", "unknown block", "block not found", "after last accepted")
_RETRYABLE_CODES = {-32603, -32005, -32016, -32002, 429}
_RETRYABLE_PHRASES = ("rate limit", "too many requests", "timeout", "timed out", "try again")
_ALREADY_KNOWN_PHRASES = ("already known", "known transaction", "already imported")


def _suggested_to_block(message: str) -> int | None:
    """Parse "this block range should work: [0x10, 0x2f]" (Alchemy) or "Try with this
    block range [0x10, 0x2F]" (Infura)."""
    marker = message.find("[")
    if marker < 0 or "block range" not in message.lower():
        return None
    inner = message[marker + 1 : message.find("]", marker)]
    parts = [p.strip() for p in inner.split(",")]
    if len(parts) != 2:
        return None
    try:
        return int(parts[1], 16) if parts[1].startswith("0x") else int(parts[1])
    except ValueError:
        return None


class _Retryable(Exception):
    """A failure worth retrying on the same or the next endpoint. ``retry_after_s`` is
    what the endpoint asked for (HTTP ``Retry-After``)."""

    def __init__(
        self, message: str, *, timeout: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.retry_after_s = retry_after_s


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify_rpc_error(error: Mapping[str, Any]) -> Exception:
    """Map a JSON-RPC error object to the exception the caller should see."""
    code = error.get("code")
    code_int = code if isinstance(code, int) else None
    message = str(error.get("message", ""))
    data = error.get("data")
    text = f"{message} {data if isinstance(data, str) else ''}".lower()
    if any(p in text for p in _RANGE_PHRASES):
        return RangeTooLarge(
            f"provider refused the block range: {message}",
            suggested_to_block=_suggested_to_block(f"{message} {data or ''}"),
            code=code_int,
        )
    if any(p in text for p in _BEHIND_PHRASES):
        return NodeBehind(f"node is behind: {message}", code=code_int)
    if code_int in _RETRYABLE_CODES or any(p in text for p in _RETRYABLE_PHRASES):
        return _Retryable(f"rpc error {code_int}: {message}")
    return RpcError(f"rpc error {code_int}: {message}", code=code_int)


# --- JSON-RPC implementation ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounds for one logical call: ``attempts_per_url`` tries on each URL, sleeping
    ``backoff_base_s * 2**n`` (capped, full jitter) between tries. An endpoint that
    answers 429/503 with a ``Retry-After`` up to ``backoff_max_s`` is waited for; one
    asking for longer is left alone that long (at most ``retry_after_max_s``) while the
    other endpoints are tried."""

    timeout_s: float = 10.0
    attempts_per_url: int = 3
    backoff_base_s: float = 0.2
    backoff_max_s: float = 2.0
    primary_retry_after_s: float = 60.0
    retry_after_max_s: float = 300.0

    @classmethod
    def for_chain(cls, chain: EvmChainSettings) -> RetryPolicy:
        """The policy of a configured chain: ``rpc_max_retries`` retries after the first
        attempt on each URL, ``rpc_timeout_s`` per request."""
        return cls(timeout_s=chain.rpc_timeout_s, attempts_per_url=chain.rpc_max_retries + 1)


class JsonRpcEvmSource:
    """`EvmSource` over HTTP JSON-RPC with failover (URLs in priority order)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        policy: RetryPolicy | None = None,
        chain: str = "evm",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not urls:
            raise ValueError("JsonRpcEvmSource needs at least one RPC URL")
        self._urls = list(urls)
        self._policy = policy or RetryPolicy()
        self._chain = chain
        self._client = httpx.Client(
            timeout=httpx.Timeout(self._policy.timeout_s),
            transport=transport,
            headers={"content-type": "application/json"},
        )
        self._lock = threading.Lock()
        self._next_id = 0
        self._current = 0
        self._failed_over_at = 0.0
        self._resting_until: dict[int, float] = {}

    @classmethod
    def for_chain(
        cls, chain: EvmChainSettings, *, transport: httpx.BaseTransport | None = None
    ) -> JsonRpcEvmSource:
        """The source of a configured chain: its URLs and `RetryPolicy.for_chain`. Every
        EVM source the daemon and the CLI build comes from here."""
        return cls(
            chain.rpc_urls,
            policy=RetryPolicy.for_chain(chain),
            chain=chain.name,
            transport=transport,
        )

    @property
    def urls(self) -> list[str]:
        return list(self._urls)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> JsonRpcEvmSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # transport ------------------------------------------------------------------------

    def _ids(self, count: int) -> list[int]:
        with self._lock:
            start = self._next_id
            self._next_id += count
        return list(range(start, start + count))

    def _url_order(self) -> list[int]:
        """URL indexes to try, current first; endpoints resting after a long Retry-After
        are left out."""
        now = time.monotonic()
        with self._lock:
            if self._current and now - self._failed_over_at > self._policy.primary_retry_after_s:
                self._current = 0
            first = self._current
            order = [(first + i) % len(self._urls) for i in range(len(self._urls))]
            return [i for i in order if self._resting_until.get(i, 0.0) <= now]

    def _rest(self, url_index: int, seconds: float) -> None:
        with self._lock:
            self._resting_until[url_index] = time.monotonic() + min(
                seconds, self._policy.retry_after_max_s
            )

    def _post(self, url: str, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """One HTTP round trip; returns the results in call order or raises."""
        ids = self._ids(len(calls))
        body = [
            {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
            for i, (method, params) in zip(ids, calls, strict=True)
        ]
        try:
            response = self._client.post(url, content=json.dumps(body))
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timeout after {self._policy.timeout_s}s", timeout=True) from exc
        except httpx.TransportError as exc:
            raise _Retryable(f"connection error: {type(exc).__name__}") from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(
                f"http {response.status_code}",
                retry_after_s=_retry_after_s(response.headers.get("retry-after")),
            )
        try:
            payload = response.json()
        except ValueError as exc:
            raise _Retryable(f"http {response.status_code}, body is not JSON") from exc
        if isinstance(payload, dict) and "error" in payload:
            # A whole-batch error (rate limit, batch refused): classify as a single error.
            raise classify_rpc_error(payload["error"])
        if response.status_code >= 400:
            raise _Retryable(f"http {response.status_code}")
        if not isinstance(payload, list):
            raise _Retryable("batch response is not a JSON array")
        by_id: dict[Any, Any] = {}
        for item in payload:
            if isinstance(item, dict) and "id" in item:
                by_id[item["id"]] = item
        results: list[Any] = []
        for i in ids:
            item = by_id.get(i)
            if item is None:
                raise _Retryable(f"batch response lacks id {i}")
            if item.get("error") is not None:
                raise classify_rpc_error(item["error"])
            if "result" not in item:
                raise _Retryable(f"response {i} has neither result nor error")
            results.append(item["result"])
        return results

    def _sleep_backoff(self, attempt: int) -> None:
        cap = min(self._policy.backoff_max_s, self._policy.backoff_base_s * (2**attempt))
        time.sleep(random.uniform(0, cap))

    def call_batch(
        self, calls: Sequence[tuple[str, list[Any]]], parse: Callable[[list[Any]], T]
    ) -> T:
        """Send ``calls`` as one batch to one node and ``parse`` its results; retry and
        fail over on transport faults, malformed answers and a lagging node."""
        last: Exception | None = None
        all_timeouts = True
        order = self._url_order()
        if not order:
            raise RpcUnavailable(
                f"every RPC endpoint of {self._chain} asked to be left alone (Retry-After); "
                f"{calls[0][0]} not sent, retry later"
            )
        for position, url_index in enumerate(order):
            url = self._urls[url_index]
            for attempt in range(self._policy.attempts_per_url):
                try:
                    results = self._post(url, calls)
                    value = parse(results)
                except RangeTooLarge:
                    raise
                except NodeBehind as exc:
                    last = exc
                except _Retryable as exc:
                    last = exc
                except RpcError:
                    raise
                except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                    last = _Retryable(f"malformed response: {exc}")
                else:
                    if position:
                        with self._lock:
                            self._current = url_index
                            self._failed_over_at = time.monotonic()
                    return value
                all_timeouts = all_timeouts and isinstance(last, _Retryable) and last.timeout
                log.warning(
                    "rpc_attempt_failed",
                    chain=self._chain,
                    url_index=url_index,
                    attempt=attempt + 1,
                    method=calls[0][0],
                    error=str(last),
                )
                wait_s = last.retry_after_s if isinstance(last, _Retryable) else None
                if wait_s is not None and wait_s > self._policy.backoff_max_s:
                    self._rest(url_index, wait_s)
                    log.warning(
                        "rpc_endpoint_resting",
                        chain=self._chain,
                        url_index=url_index,
                        retry_after_s=wait_s,
                    )
                    break
                if attempt + 1 < self._policy.attempts_per_url:
                    if wait_s is not None:
                        time.sleep(wait_s)
                    else:
                        self._sleep_backoff(attempt)
            if position + 1 < len(order):
                log.warning("rpc_failover", chain=self._chain, from_url_index=url_index)
        if isinstance(last, NodeBehind):
            raise last
        raise RpcUnavailable(
            f"all {len(self._urls)} RPC endpoint(s) failed for {calls[0][0]}: {last}; "
            "check the nodes or the chain's rpc_urls",
            timed_out=all_timeouts,
        )

    def call(self, method: str, params: list[Any], parse: Callable[[Any], T]) -> T:
        return self.call_batch([(method, params)], lambda results: parse(results[0]))

    # EvmSource ----------------------------------------------------------------------

    def chain_id(self) -> int:
        return self.call("eth_chainId", [], _hex_to_int)

    def head(self) -> int:
        return self.call("eth_blockNumber", [], _hex_to_int)

    def block_header(self, number: int) -> BlockHeader:
        return self.block_headers([number])[0]

    def block_headers(self, numbers: Sequence[int]) -> list[BlockHeader]:
        if not numbers:
            return []
        calls = [("eth_getBlockByNumber", [hex(n), False]) for n in numbers]
        return self.call_batch(
            calls,
            lambda results: [
                _decode_header(raw, n) for raw, n in zip(results, numbers, strict=True)
            ],
        )

    def head_with_headers(self, numbers: Sequence[int]) -> tuple[int, list[BlockHeader | None]]:
        def parse(results: list[Any]) -> tuple[int, list[BlockHeader | None]]:
            head = _hex_to_int(results[0])
            return head, [
                None if raw is None else _decode_header(raw, n)
                for raw, n in zip(results[1:], numbers, strict=True)
            ]

        calls = [
            ("eth_blockNumber", []),
            *(("eth_getBlockByNumber", [hex(n), False]) for n in numbers),
        ]
        return self.call_batch(calls, parse)

    def _logs_call(self, contract: str, from_block: int, to_block: int) -> tuple[str, list[Any]]:
        if from_block > to_block:
            raise ValueError(f"from_block {from_block} > to_block {to_block}")
        return (
            "eth_getLogs",
            [
                {
                    "address": contract,
                    "fromBlock": hex(from_block),
                    "toBlock": hex(to_block),
                    "topics": [TRANSFER_TOPIC],
                }
            ],
        )

    @staticmethod
    def _decode_logs(raw_logs: Any) -> list[TransferLog]:
        if not isinstance(raw_logs, list):
            raise TypeError("eth_getLogs result is not a list")
        decoded = (decode_transfer_log(raw) for raw in raw_logs)
        return [entry for entry in decoded if entry is not None]

    def get_transfer_logs(self, contract: str, from_block: int, to_block: int) -> list[TransferLog]:
        return self.call_batch(
            [self._logs_call(contract, from_block, to_block)],
            lambda results: self._decode_logs(results[0]),
        )

    def logs_with_end_header(
        self, contract: str, from_block: int, to_block: int
    ) -> tuple[list[TransferLog], BlockHeader]:
        def parse(results: list[Any]) -> tuple[list[TransferLog], BlockHeader]:
            end = _decode_header(results[1], to_block)
            logs = self._decode_logs(results[0])
            _check_window(logs, from_block, to_block, end)
            return logs, end

        return self.call_batch(
            [
                self._logs_call(contract, from_block, to_block),
                ("eth_getBlockByNumber", [hex(to_block), False]),
            ],
            parse,
        )

    def transfers_to(
        self, addresses: Sequence[str], from_block: int, to_block: int
    ) -> tuple[list[TransferLog], BlockHeader]:
        if from_block > to_block:
            raise ValueError(f"from_block {from_block} > to_block {to_block}")
        recipients = ["0x" + a.lower().removeprefix("0x").rjust(64, "0") for a in addresses]
        query = {
            "fromBlock": hex(from_block),
            "toBlock": hex(to_block),
            "topics": [TRANSFER_TOPIC, None, recipients],
        }

        def parse(results: list[Any]) -> tuple[list[TransferLog], BlockHeader]:
            end = _decode_header(results[1], to_block)
            logs = self._decode_logs(results[0])
            _check_window(logs, from_block, to_block, end)
            return logs, end

        return self.call_batch(
            [("eth_getLogs", [query]), ("eth_getBlockByNumber", [hex(to_block), False])], parse
        )

    def receipt(self, tx_hash: str) -> TxReceipt | None:
        def parse(raw: Any) -> TxReceipt | None:
            if raw is None or raw.get("blockNumber") is None:
                return None
            return TxReceipt(
                tx_hash=_hash32(raw["transactionHash"]),
                block_number=_hex_to_int(raw["blockNumber"]),
                block_hash=_hash32(raw["blockHash"]),
                succeeded=_hex_to_int(raw["status"]) == 1,
                gas_used=_hex_to_int(raw["gasUsed"]),
                effective_gas_price_wei=_hex_to_int(raw.get("effectiveGasPrice", "0x0")),
            )

        return self.call("eth_getTransactionReceipt", [tx_hash], parse)

    def send_raw_transaction(self, raw_tx: bytes) -> str:
        tx_hash = "0x" + keccak(raw_tx).hex()
        try:
            answered = self.call("eth_sendRawTransaction", ["0x" + raw_tx.hex()], _hash32)
        except RpcError as exc:
            # A rebroadcast of a transaction the node has (pending: "already known") or
            # has mined ("nonce too low") is a success, not a reason to sign anew.
            if any(p in str(exc).lower() for p in _ALREADY_KNOWN_PHRASES):
                return tx_hash
            if not isinstance(exc, RpcUnavailable) and self.receipt(tx_hash) is not None:
                return tx_hash
            raise
        if answered != tx_hash:
            raise RpcError(f"node returned tx hash {answered}, expected {tx_hash}")
        return tx_hash

    def nonce(self, address: str, *, pending: bool = True) -> int:
        tag = "pending" if pending else "latest"
        return self.call("eth_getTransactionCount", [address, tag], _hex_to_int)

    def gas_price_wei(self) -> int:
        return self.call("eth_gasPrice", [], _hex_to_int)

    def max_priority_fee_wei(self) -> int:
        return self.call("eth_maxPriorityFeePerGas", [], _hex_to_int)

    def fee_history(self, block_count: int, reward_percentiles: Sequence[float] = ()) -> FeeHistory:
        def parse(raw: Any) -> FeeHistory:
            return FeeHistory(
                oldest_block=_hex_to_int(raw["oldestBlock"]),
                base_fee_per_gas_wei=[_hex_to_int(v) for v in raw["baseFeePerGas"]],
                gas_used_ratio=[float(v) for v in raw["gasUsedRatio"]],
                reward_wei=[[_hex_to_int(v) for v in row] for row in raw.get("reward") or []],
            )

        return self.call(
            "eth_feeHistory", [hex(block_count), "latest", list(reward_percentiles)], parse
        )

    def estimate_gas(self, tx: Mapping[str, Any]) -> int:
        return self.call("eth_estimateGas", [dict(tx)], _hex_to_int)

    def native_balance_wei(self, address: str) -> int:
        return self.call("eth_getBalance", [address, "latest"], _hex_to_int)

    def erc20_balance(self, contract: str, address: str) -> int:
        data = _BALANCE_OF_SELECTOR + address.lower().removeprefix("0x").rjust(64, "0")
        return self.call("eth_call", [{"to": contract, "data": data}, "latest"], _hex_to_int)


_BALANCE_OF_SELECTOR = "0x70a08231"


# --- in-process implementation ----------------------------------------------------------


class EthTesterSource:
    """`EvmSource` over an in-process `eth_tester.EthereumTester` (py-evm backend)."""

    def __init__(self, tester: Any | None = None) -> None:
        from eth_tester import EthereumTester

        self.tester: Any = tester if tester is not None else EthereumTester()
        self._chain_id = int(self.tester.backend.chain.chain_id)

    def chain_id(self) -> int:
        return self._chain_id

    def head(self) -> int:
        return int(self.tester.get_block_by_number("latest")["number"])

    def _header(self, number: int) -> BlockHeader:
        from eth_tester.exceptions import BlockNotFound

        try:
            raw = self.tester.get_block_by_number(number)
        except BlockNotFound as exc:
            raise NodeBehind(f"block {number} does not exist yet; retry later") from exc
        return BlockHeader(
            number=int(raw["number"]),
            hash=_hash32(raw["hash"]),
            parent_hash=_hash32(raw["parent_hash"]),
            timestamp=int(raw["timestamp"]),
        )

    def block_header(self, number: int) -> BlockHeader:
        return self._header(number)

    def block_headers(self, numbers: Sequence[int]) -> list[BlockHeader]:
        return [self._header(n) for n in numbers]

    def head_with_headers(self, numbers: Sequence[int]) -> tuple[int, list[BlockHeader | None]]:
        head = self.head()
        return head, [self._header(n) if n <= head else None for n in numbers]

    def get_transfer_logs(self, contract: str, from_block: int, to_block: int) -> list[TransferLog]:
        return self._transfer_logs(_checksum(contract), from_block, to_block)

    def transfers_to(
        self, addresses: Sequence[str], from_block: int, to_block: int
    ) -> tuple[list[TransferLog], BlockHeader]:
        wanted = {a.lower() for a in addresses}
        logs = [
            e
            for e in self._transfer_logs(None, from_block, to_block)
            if e.to_addr.lower() in wanted
        ]
        end = self._header(to_block)
        _check_window(logs, from_block, to_block, end)
        return logs, end

    def _transfer_logs(
        self, contract: str | None, from_block: int, to_block: int
    ) -> list[TransferLog]:
        if from_block > to_block:
            raise ValueError(f"from_block {from_block} > to_block {to_block}")
        head = self.head()
        if to_block > head:
            raise NodeBehind(f"block {to_block} does not exist yet (head {head}); retry later")
        raw_logs = self.tester.get_logs(
            from_block=from_block, to_block=to_block, address=contract, topics=[TRANSFER_TOPIC]
        )
        out: list[TransferLog] = []
        for raw in raw_logs:
            data = raw["data"]
            entry = decode_transfer_log(
                {
                    "topics": [_as_hex(t) for t in raw["topics"]],
                    "data": _as_hex(data),
                    "blockNumber": hex(raw["block_number"]),
                    "blockHash": _as_hex(raw["block_hash"]),
                    "transactionHash": _as_hex(raw["transaction_hash"]),
                    "logIndex": hex(raw["log_index"]),
                    "address": raw["address"],
                    "removed": False,
                }
            )
            if entry is not None:
                out.append(entry)
        out.sort(key=lambda e: (e.block_number, e.log_index))
        return out

    def logs_with_end_header(
        self, contract: str, from_block: int, to_block: int
    ) -> tuple[list[TransferLog], BlockHeader]:
        logs = self.get_transfer_logs(contract, from_block, to_block)
        end = self._header(to_block)
        _check_window(logs, from_block, to_block, end)
        return logs, end

    def receipt(self, tx_hash: str) -> TxReceipt | None:
        from eth_tester.exceptions import TransactionNotFound

        try:
            raw = self.tester.get_transaction_receipt(tx_hash)
        except TransactionNotFound:
            return None
        if raw.get("block_number") is None:
            return None
        return TxReceipt(
            tx_hash=_hash32(_as_hex(raw["transaction_hash"])),
            block_number=int(raw["block_number"]),
            block_hash=_hash32(_as_hex(raw["block_hash"])),
            succeeded=int(raw["status"]) == 1,
            gas_used=int(raw["gas_used"]),
            effective_gas_price_wei=int(raw.get("effective_gas_price") or 0),
        )

    def send_raw_transaction(self, raw_tx: bytes) -> str:
        tx_hash = "0x" + keccak(raw_tx).hex()
        if self.receipt(tx_hash) is not None:
            return tx_hash
        try:
            self.tester.send_raw_transaction("0x" + raw_tx.hex())
        except Exception as exc:
            # eth-tester raises ValidationError & co for nonce/fee problems.
            raise RpcError(f"transaction rejected: {exc}") from exc
        return tx_hash

    def nonce(self, address: str, *, pending: bool = True) -> int:
        return int(self.tester.get_nonce(address, "pending" if pending else "latest"))

    def _base_fee(self) -> int:
        return int(self.tester.get_block_by_number("latest").get("base_fee_per_gas") or 0)

    def gas_price_wei(self) -> int:
        return self._base_fee() + self.max_priority_fee_wei()

    def max_priority_fee_wei(self) -> int:
        return 1_000_000_000

    def fee_history(self, block_count: int, reward_percentiles: Sequence[float] = ()) -> FeeHistory:
        head = self.head()
        first = max(0, head - block_count + 1)
        blocks = [self.tester.get_block_by_number(n) for n in range(first, head + 1)]
        base_fees = [int(b.get("base_fee_per_gas") or 0) for b in blocks]
        # Like eth_feeHistory: one more base fee than blocks, the next block's (EIP-1559).
        last = blocks[-1]
        base_fees.append(
            _next_base_fee(base_fees[-1], int(last["gas_used"]), int(last["gas_limit"]))
        )
        return FeeHistory(
            oldest_block=first,
            base_fee_per_gas_wei=base_fees,
            gas_used_ratio=[int(b["gas_used"]) / int(b["gas_limit"]) for b in blocks],
            reward_wei=[[self.max_priority_fee_wei() for _ in reward_percentiles] for _ in blocks],
        )

    def estimate_gas(self, tx: Mapping[str, Any]) -> int:
        converted: dict[str, Any] = {}
        for key, value in tx.items():
            numeric = key in ("value", "gas", "maxFeePerGas", "maxPriorityFeePerGas", "gasPrice")
            converted[_SNAKE.get(key, key)] = _hex_to_int(value) if numeric else value
        return int(self.tester.estimate_gas(converted))

    def native_balance_wei(self, address: str) -> int:
        return int(self.tester.get_balance(_checksum(address)))

    def erc20_balance(self, contract: str, address: str) -> int:
        data = _BALANCE_OF_SELECTOR + address.lower().removeprefix("0x").rjust(64, "0")
        caller = self.tester.get_accounts()[0]
        raw = self.tester.call({"from": caller, "to": _checksum(contract), "data": data})
        return int(_as_hex(raw), 16)

    # simulator controls -------------------------------------------------------------

    def mine_blocks(self, count: int = 1) -> list[str]:
        """Mine ``count`` empty blocks; returns their hashes."""
        return [_as_hex(h) for h in self.tester.mine_blocks(count)]

    def snapshot(self) -> int:
        return int(self.tester.take_snapshot())

    def revert(self, snapshot_id: int) -> None:
        self.tester.revert_to_snapshot(snapshot_id)


def _next_base_fee(base_fee: int, gas_used: int, gas_limit: int) -> int:
    target = gas_limit // 2
    if gas_used == target:
        return base_fee
    if gas_used > target:
        return base_fee + max(1, base_fee * (gas_used - target) // target // 8)
    return base_fee - base_fee * (target - gas_used) // target // 8


_SNAKE = {
    "maxFeePerGas": "max_fee_per_gas",
    "maxPriorityFeePerGas": "max_priority_fee_per_gas",
    "gasPrice": "gas_price",
}


def _as_hex(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    return str(value).lower()
