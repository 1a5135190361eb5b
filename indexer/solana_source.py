"""What the Solana indexer needs from a node, as a small protocol with typed results.

``SolanaSource`` is the protocol; ``SolanaRpcSource`` implements it on the real
``solana`` client (``AsyncClient.send_rpc_request``, driven from a private event loop so
callers stay synchronous), with failover across URLs, per-request timeouts and bounded
retries with exponential backoff and jitter. Amounts are ints in base units.

Each node error code is treated by its meaning (``call``): -32007/-32009 (slot skipped)
raise ``SlotSkipped``; -32004/-32014 (not available yet) ``BlockNotAvailable`` and
-32001 (cleaned up) ``HistoryPruned``, both only after the other URLs were asked too;
-32016 (the replica is below the requested minContextSlot), HTTP 429 (waiting at least its
``Retry-After``), 5xx, timeouts and garbage are retried and failed over, then
``RpcUnavailable`` / ``NodeBehind``. Every request and failure is counted per method.
"""

from __future__ import annotations

import asyncio
import base64
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
import structlog
from prometheus_client import Counter
from solana.exceptions import SolanaRpcException
from solana.rpc.async_api import AsyncClient
from solana.rpc.jsonrpc import JsonRpcRequest, SolanaJsonRpcError

from escrowd.indexer.errors import (
    BlockNotAvailable,
    HistoryPruned,
    NodeBehind,
    RpcError,
    RpcUnavailable,
    SlotSkipped,
)

log = structlog.get_logger(__name__)

Commitment = Literal["processed", "confirmed", "finalized"]
# "none": the header only; "signatures": the header and the signatures it holds;
# "accounts": each transaction's keys, balances and token balances, without instructions.
TransactionDetails = Literal["full", "accounts", "signatures", "none"]

TOKEN_PROGRAM_ID = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"
SKIPPED_CODES = frozenset({-32007, -32009})
NOT_AVAILABLE_CODES = frozenset({-32004, -32014})
CLEANED_UP_CODE = -32001
MIN_CONTEXT_SLOT_CODE = -32016
# Answers that say the request itself is wrong: retrying or failing over cannot help.
FINAL_CODES = frozenset({-32700, -32600, -32601, -32602, -32002, -32003, -32015})
# getMultipleAccounts takes at most this many addresses per call.
MAX_MULTIPLE_ACCOUNTS = 100

RPC_REQUESTS = Counter(
    "escrowd_solana_rpc_requests_total",
    "Solana JSON-RPC requests sent, by method (each attempt on each URL counts).",
    ["method"],
)
RPC_FAILURES = Counter(
    "escrowd_solana_rpc_failures_total",
    "Solana JSON-RPC attempts that failed, by method and reason (http_429, http_5xx, "
    "timeout, transport, malformed, or the node's error code).",
    ["method", "reason"],
)


@dataclass(frozen=True)
class SignatureInfo:
    signature: str
    slot: int
    err: Any  # the node's TransactionError JSON; None when the transaction succeeded
    block_time: int | None
    confirmation_status: str | None


@dataclass(frozen=True)
class TokenBalanceEntry:
    account_index: int
    mint: str
    owner: str | None
    program_id: str | None
    amount_base_units: int
    decimals: int


@dataclass(frozen=True)
class SolanaTransaction:
    signature: str
    slot: int
    block_time: int | None
    err: Any
    fee_lamports: int
    account_keys: tuple[str, ...]
    pre_balances: tuple[int, ...]
    post_balances: tuple[int, ...]
    pre_token_balances: tuple[TokenBalanceEntry, ...]
    post_token_balances: tuple[TokenBalanceEntry, ...]

    @property
    def succeeded(self) -> bool:
        return self.err is None


@dataclass(frozen=True)
class SolanaBlock:
    slot: int
    parent_slot: int
    blockhash: str
    previous_blockhash: str
    block_height: int | None
    block_time: int | None
    transactions: tuple[SolanaTransaction, ...]
    # Filled by transaction_details="signatures" only.
    signatures: tuple[str, ...] = ()


@dataclass(frozen=True)
class AccountState:
    """An account as getMultipleAccounts shows it: lamports and (a slice of) its data."""

    lamports: int
    owner: str
    data: bytes


@dataclass(frozen=True)
class AccountStates:
    context_slot: int
    accounts: tuple[AccountState | None, ...]


@dataclass(frozen=True)
class TokenAccountBalance:
    address: str
    mint: str
    owner: str
    amount_base_units: int
    decimals: int


@dataclass(frozen=True)
class LatestBlockhash:
    blockhash: str
    last_valid_block_height: int
    context_slot: int


@dataclass(frozen=True)
class SignatureStatus:
    slot: int
    err: Any
    confirmation_status: str | None
    confirmations: int | None


class SolanaSource(Protocol):
    """A Solana node as the indexer and payouts see it."""

    def get_slot(
        self, commitment: Commitment = "finalized", *, min_context_slot: int | None = None
    ) -> int: ...

    def get_block_height(self, commitment: Commitment = "finalized") -> int: ...

    def get_signatures_for_address(
        self,
        address: str,
        *,
        before: str | None = None,
        until: str | None = None,
        limit: int = 1000,
        commitment: Commitment = "finalized",
        min_context_slot: int | None = None,
    ) -> list[SignatureInfo]:
        """Newest first, as the node answers."""
        ...

    def get_transaction(
        self, signature: str, commitment: Commitment = "finalized"
    ) -> SolanaTransaction | None: ...

    def get_blocks(
        self, start_slot: int, end_slot: int | None = None, commitment: Commitment = "finalized"
    ) -> list[int]: ...

    def get_blocks_with_limit(
        self, start_slot: int, limit: int, commitment: Commitment = "finalized"
    ) -> list[int]: ...

    def get_first_available_block(self) -> int: ...

    def get_multiple_accounts(
        self,
        addresses: Sequence[str],
        *,
        commitment: Commitment = "confirmed",
        min_context_slot: int | None = None,
        data_slice: tuple[int, int] | None = None,
    ) -> AccountStates:
        """At most MAX_MULTIPLE_ACCOUNTS addresses; None for an account that does not exist."""
        ...

    def get_block(
        self,
        slot: int,
        commitment: Commitment = "finalized",
        *,
        transaction_details: TransactionDetails = "full",
    ) -> SolanaBlock:
        """Raises ``SlotSkipped``, ``BlockNotAvailable`` or ``HistoryPruned`` for slots
        without a block here (a null answer is ``BlockNotAvailable``)."""
        ...

    def get_balance(self, address: str, commitment: Commitment = "finalized") -> int: ...

    def get_token_accounts_by_owner(
        self, owner: str, mint: str | None = None, commitment: Commitment = "finalized"
    ) -> list[TokenAccountBalance]: ...

    def get_latest_blockhash(self, commitment: Commitment = "finalized") -> LatestBlockhash: ...

    def send_raw_transaction(self, raw: bytes, *, skip_preflight: bool = False) -> str: ...

    def get_signature_statuses(
        self, signatures: Sequence[str], *, search_transaction_history: bool = True
    ) -> list[SignatureStatus | None]: ...

    def get_minimum_balance_for_rent_exemption(self, data_len: int) -> int: ...


# ---- decoding the node's JSON ---------------------------------------------------------


def _token_balances(entries: list[dict[str, Any]] | None) -> tuple[TokenBalanceEntry, ...]:
    return tuple(
        TokenBalanceEntry(
            account_index=int(entry["accountIndex"]),
            mint=str(entry["mint"]),
            owner=entry.get("owner"),
            program_id=entry.get("programId"),
            amount_base_units=int(entry["uiTokenAmount"]["amount"]),
            decimals=int(entry["uiTokenAmount"]["decimals"]),
        )
        for entry in entries or []
    )


def parse_transaction(
    entry: dict[str, Any], slot: int, block_time: int | None
) -> SolanaTransaction:
    """One transaction (``json`` or ``jsonParsed`` encoding, or a block's ``accounts``
    details, whose keys already include those loaded from lookup tables) with its meta."""
    tx = entry["transaction"]
    meta = entry.get("meta") or {}
    listed = tx["message"]["accountKeys"] if "message" in tx else tx["accountKeys"]
    keys = [k["pubkey"] if isinstance(k, dict) else k for k in listed]
    loaded = meta.get("loadedAddresses") or {}
    keys += list(loaded.get("writable", [])) + list(loaded.get("readonly", []))
    return SolanaTransaction(
        signature=str(tx["signatures"][0]),
        slot=slot,
        block_time=block_time,
        err=meta.get("err"),
        fee_lamports=int(meta.get("fee", 0)),
        account_keys=tuple(str(k) for k in keys),
        pre_balances=tuple(int(b) for b in meta.get("preBalances", [])),
        post_balances=tuple(int(b) for b in meta.get("postBalances", [])),
        pre_token_balances=_token_balances(meta.get("preTokenBalances")),
        post_token_balances=_token_balances(meta.get("postTokenBalances")),
    )


class SolanaRpcSource:
    """``SolanaSource`` over JSON-RPC with failover, timeouts and bounded retries.

    Calls are synchronous and serialized (one private event loop); do not call from
    inside a running asyncio loop. Each request tries the URLs in turn, starting with
    the last one that worked; a full round of failures waits ``backoff_base_s * 2**n``
    (capped, with jitter, and at least a 429's ``Retry-After`` up to
    ``retry_after_max_s``) before the next, up to ``max_rounds`` rounds, then raises
    ``RpcUnavailable`` (``NodeBehind`` when every answer was -32016). ``calls`` counts
    the requests sent per method.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float = 10.0,
        max_rounds: int = 4,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 5.0,
        retry_after_max_s: float = 10.0,
    ) -> None:
        if not urls:
            raise ValueError("SolanaRpcSource needs at least one RPC URL")
        assert max_rounds >= 1 and timeout_s > 0
        self.urls = list(urls)
        self.timeout_s = timeout_s
        self.max_rounds = max_rounds
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.calls: CallCounter = CallCounter()
        self._preferred = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._clients: dict[str, AsyncClient] = {}
        self._request_id = 0

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                self._loop.run_until_complete(client.close())
            self._clients.clear()
            self._loop.close()

    def __enter__(self) -> SolanaRpcSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- transport -------------------------------------------------------------------

    def _client(self, url: str) -> AsyncClient:
        client = self._clients.get(url)
        if client is None:
            # Our own retry loop decides; the client's transport retries would hide faults.
            client = AsyncClient(url, timeout=self.timeout_s, max_transport_retries=0, http2=False)
            self._clients[url] = client
        return client

    def call(self, method: str, params: list[Any]) -> Any:
        """One JSON-RPC call with failover and retries; returns the raw ``result``."""
        with self._lock:
            last_problem = "no attempt made"
            retry_after_s = 0.0
            behind_only = True
            for round_no in range(self.max_rounds):
                if round_no:
                    delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (round_no - 1))
                    time.sleep(max(delay * (0.5 + random.random() / 2), retry_after_s))
                    retry_after_s = 0.0
                # A slot-state answer (not available yet, cleaned up) is the meaning of
                # the request on that node; another URL may still have the block.
                slot_state: RpcError | None = None
                for step in range(len(self.urls)):
                    index = (self._preferred + step) % len(self.urls)
                    url = self.urls[index]
                    self.calls[method] += 1
                    RPC_REQUESTS.labels(method).inc()
                    try:
                        result = self._call_once(url, method, params)
                    except SolanaJsonRpcError as exc:
                        RPC_FAILURES.labels(method, str(exc.code)).inc()
                        if exc.code in SKIPPED_CODES:
                            raise SlotSkipped(exc.message, code=exc.code) from None
                        if exc.code in NOT_AVAILABLE_CODES:
                            slot_state = BlockNotAvailable(exc.message, code=exc.code)
                            continue
                        if exc.code == CLEANED_UP_CODE:
                            slot_state = slot_state or HistoryPruned(exc.message, code=exc.code)
                            continue
                        if exc.code in FINAL_CODES:
                            raise RpcError(f"{method}: {exc.message}", code=exc.code) from None
                        behind_only = behind_only and exc.code == MIN_CONTEXT_SLOT_CODE
                        last_problem = f"node error {exc.code}: {exc.message}"
                    except SolanaRpcException as exc:
                        behind_only = False
                        reason, last_problem, wait_s = _transport_problem(exc)
                        RPC_FAILURES.labels(method, reason).inc()
                        retry_after_s = max(retry_after_s, min(wait_s, self.retry_after_max_s))
                    except ValueError as exc:  # a body that is not JSON-RPC
                        behind_only = False
                        RPC_FAILURES.labels(method, "malformed").inc()
                        last_problem = f"malformed answer: {exc}"
                    else:
                        self._preferred = index
                        return result
                    log.warning(
                        "solana_rpc_attempt_failed",
                        method=method,
                        url=url,
                        round=round_no,
                        problem=last_problem,
                    )
                if slot_state is not None:
                    raise slot_state
            error = NodeBehind if behind_only else RpcUnavailable
            raise error(
                f"{method} failed on all {len(self.urls)} Solana RPC URL(s) after "
                f"{self.max_rounds} rounds (last: {last_problem}); retry on the next poll"
            )

    def _call_once(self, url: str, method: str, params: list[Any]) -> Any:
        self._request_id += 1
        request = JsonRpcRequest(id=self._request_id, method=method, params=params)
        return self._loop.run_until_complete(self._client(url).send_rpc_request(request, Any))

    # ---- SolanaSource ------------------------------------------------------------------

    def get_slot(
        self, commitment: Commitment = "finalized", *, min_context_slot: int | None = None
    ) -> int:
        config: dict[str, Any] = {"commitment": commitment}
        if min_context_slot is not None:
            config["minContextSlot"] = min_context_slot
        return int(self.call("getSlot", [config]))

    def get_block_height(self, commitment: Commitment = "finalized") -> int:
        return int(self.call("getBlockHeight", [{"commitment": commitment}]))

    def get_signatures_for_address(
        self,
        address: str,
        *,
        before: str | None = None,
        until: str | None = None,
        limit: int = 1000,
        commitment: Commitment = "finalized",
        min_context_slot: int | None = None,
    ) -> list[SignatureInfo]:
        assert 1 <= limit <= 1000
        config: dict[str, Any] = {"limit": limit, "commitment": commitment}
        if before is not None:
            config["before"] = before
        if until is not None:
            config["until"] = until
        if min_context_slot is not None:
            config["minContextSlot"] = min_context_slot
        result = self.call("getSignaturesForAddress", [address, config])
        return [
            SignatureInfo(
                signature=str(item["signature"]),
                slot=int(item["slot"]),
                err=item.get("err"),
                block_time=item.get("blockTime"),
                confirmation_status=item.get("confirmationStatus"),
            )
            for item in result
        ]

    def get_transaction(
        self, signature: str, commitment: Commitment = "finalized"
    ) -> SolanaTransaction | None:
        config = {"encoding": "json", "commitment": commitment, "maxSupportedTransactionVersion": 0}
        result = self.call("getTransaction", [signature, config])
        if result is None:
            return None
        return parse_transaction(result, int(result["slot"]), result.get("blockTime"))

    def get_blocks(
        self, start_slot: int, end_slot: int | None = None, commitment: Commitment = "finalized"
    ) -> list[int]:
        params: list[Any] = [start_slot]
        if end_slot is not None:
            params.append(end_slot)
        params.append({"commitment": commitment})
        return [int(slot) for slot in self.call("getBlocks", params)]

    def get_blocks_with_limit(
        self, start_slot: int, limit: int, commitment: Commitment = "finalized"
    ) -> list[int]:
        params = [start_slot, limit, {"commitment": commitment}]
        return [int(slot) for slot in self.call("getBlocksWithLimit", params)]

    def get_first_available_block(self) -> int:
        return int(self.call("getFirstAvailableBlock", []))

    def get_multiple_accounts(
        self,
        addresses: Sequence[str],
        *,
        commitment: Commitment = "confirmed",
        min_context_slot: int | None = None,
        data_slice: tuple[int, int] | None = None,
    ) -> AccountStates:
        assert len(addresses) <= MAX_MULTIPLE_ACCOUNTS
        config: dict[str, Any] = {"encoding": "base64", "commitment": commitment}
        if min_context_slot is not None:
            config["minContextSlot"] = min_context_slot
        if data_slice is not None:
            config["dataSlice"] = {"offset": data_slice[0], "length": data_slice[1]}
        result = self.call("getMultipleAccounts", [list(addresses), config])
        accounts = tuple(
            None
            if item is None
            else AccountState(
                lamports=int(item["lamports"]),
                owner=str(item["owner"]),
                data=base64.b64decode(item["data"][0]),
            )
            for item in result["value"]
        )
        if len(accounts) != len(addresses):
            raise RpcUnavailable(
                f"getMultipleAccounts answered {len(accounts)} accounts for {len(addresses)}"
            )
        return AccountStates(int(result["context"]["slot"]), accounts)

    def get_block(
        self,
        slot: int,
        commitment: Commitment = "finalized",
        *,
        transaction_details: TransactionDetails = "full",
    ) -> SolanaBlock:
        config = {
            "encoding": "json",
            "transactionDetails": transaction_details,
            "rewards": False,
            "commitment": commitment,
            "maxSupportedTransactionVersion": 0,
        }
        result = self.call("getBlock", [slot, config])
        if result is None:
            raise BlockNotAvailable(f"getBlock answered null for slot {slot}")
        block_time = result.get("blockTime")
        return SolanaBlock(
            slot=slot,
            parent_slot=int(result["parentSlot"]),
            blockhash=str(result["blockhash"]),
            previous_blockhash=str(result["previousBlockhash"]),
            block_height=result.get("blockHeight"),
            block_time=block_time,
            transactions=tuple(
                parse_transaction(entry, slot, block_time)
                for entry in result.get("transactions", [])
            ),
            signatures=tuple(str(s) for s in result.get("signatures", [])),
        )

    def get_balance(self, address: str, commitment: Commitment = "finalized") -> int:
        return int(self.call("getBalance", [address, {"commitment": commitment}])["value"])

    def get_token_accounts_by_owner(
        self, owner: str, mint: str | None = None, commitment: Commitment = "finalized"
    ) -> list[TokenAccountBalance]:
        token_filter = {"mint": mint} if mint is not None else {"programId": TOKEN_PROGRAM_ID}
        config = {"encoding": "jsonParsed", "commitment": commitment}
        result = self.call("getTokenAccountsByOwner", [owner, token_filter, config])
        found = []
        for item in result["value"]:
            info = item["account"]["data"]["parsed"]["info"]
            found.append(
                TokenAccountBalance(
                    address=str(item["pubkey"]),
                    mint=str(info["mint"]),
                    owner=str(info["owner"]),
                    amount_base_units=int(info["tokenAmount"]["amount"]),
                    decimals=int(info["tokenAmount"]["decimals"]),
                )
            )
        return found

    def get_latest_blockhash(self, commitment: Commitment = "finalized") -> LatestBlockhash:
        result = self.call("getLatestBlockhash", [{"commitment": commitment}])
        return LatestBlockhash(
            blockhash=str(result["value"]["blockhash"]),
            last_valid_block_height=int(result["value"]["lastValidBlockHeight"]),
            context_slot=int(result["context"]["slot"]),
        )

    def send_raw_transaction(self, raw: bytes, *, skip_preflight: bool = False) -> str:
        config = {
            "encoding": "base64",
            "skipPreflight": skip_preflight,
            "preflightCommitment": "confirmed",
            # We rebroadcast ourselves (payouts keep the signed bytes).
            "maxRetries": 0,
        }
        return str(self.call("sendTransaction", [base64.b64encode(raw).decode(), config]))

    def get_signature_statuses(
        self, signatures: Sequence[str], *, search_transaction_history: bool = True
    ) -> list[SignatureStatus | None]:
        assert len(signatures) <= 256
        config = {"searchTransactionHistory": search_transaction_history}
        result = self.call("getSignatureStatuses", [list(signatures), config])
        return [
            None
            if item is None
            else SignatureStatus(
                slot=int(item["slot"]),
                err=item.get("err"),
                confirmation_status=item.get("confirmationStatus"),
                confirmations=item.get("confirmations"),
            )
            for item in result["value"]
        ]

    def get_minimum_balance_for_rent_exemption(self, data_len: int) -> int:
        return int(self.call("getMinimumBalanceForRentExemption", [data_len]))


def _transport_problem(exc: SolanaRpcException) -> tuple[str, str, float]:
    """(metric reason, description, seconds the server asked us to wait)."""
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        wait_s = 0.0
        if status == 429:
            try:
                wait_s = float(response.headers.get("Retry-After") or 0)  # type: ignore[union-attr]
            except ValueError:
                wait_s = 0.0  # an HTTP date: fall back to our own backoff
        return f"http_{status}", f"HTTP {status}", wait_s
    if isinstance(cause, httpx.TimeoutException):
        return "timeout", f"timeout: {cause}", 0.0
    name = type(cause).__name__ if cause else type(exc).__name__
    return "transport", f"{name}: {cause or exc}", 0.0


class CallCounter(dict[str, int]):
    """Requests sent per method (a dict that starts every method at 0)."""

    def __missing__(self, method: str) -> int:
        return 0

    def total(self) -> int:
        return sum(self.values())
