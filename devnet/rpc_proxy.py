"""A fault-injecting JSON-RPC proxy: real node(s) behind it, the faults real providers show
in front of it, switchable while it runs. For tests (in-process) and operators' drills
(`escrowd devnet proxy --upstream URL ... --port N`).

    with RpcProxy(["http://127.0.0.1:8545"]) as proxy:
        proxy.add(Fault.of("http_status", status=429, retry_after_s=1, times=2))
        proxy.add(Fault.of("node_behind", blocks=5))
        ...                       # point the client at proxy.url
        proxy.clear()

A request (one call or a batch) goes to one upstream: the first, each in turn
(``mode="round_robin"``) or one at random (``"random"``, seeded), like a load balancer.
Each fault matches calls by JSON-RPC method (none named: every call), by upstream index
and, in-process, by a predicate on (method, params). A fault either answers the whole
HTTP request (status, hang, truncated or non-JSON body) or changes the answers of the
calls it matches (an error object, a replaced result, logs missing at the head, a node
lagging N blocks, a replica on another fork); calls no fault answers are forwarded in one
batch. ``times`` bounds how often a fault fires (it fires when it changes an answer); an
exhausted fault is dropped.

Control endpoint on the same port: ``GET /_proxy/faults``, ``POST /_proxy/faults`` with a
fault as JSON (``{"kind": "node_behind", "blocks": 5, "times": 10}``), ``DELETE
/_proxy/faults`` (all) or ``/_proxy/faults/<id>``, ``GET /_proxy/stats``.

Fault kinds are classes registered in `FAULT_KINDS`; a chain-specific fault (a Solana
``getSignaturesForAddress`` page answering ``[]``) is a ``result`` fault with a
predicate, or a subclass registered there.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import structlog
from eth_utils.crypto import keccak

log = structlog.get_logger(__name__)

CONTROL_PREFIX = "/_proxy"
MODES = ("first", "round_robin", "random")

Call = dict[str, Any]
Answer = dict[str, Any]
Predicate = Callable[[str, list[Any]], bool]


class FaultSpecError(ValueError):
    """A fault description the proxy cannot use; the message names the field."""


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    # Seconds to wait before answering; with ``drop`` the connection is then closed
    # without an answer (a hang the client must time out on).
    delay_s: float = 0.0
    drop: bool = False


class Upstream:
    """What a fault may ask about the upstream a request goes to (one eth_blockNumber per
    HTTP request at most, asked only when a fault needs it)."""

    def __init__(self, proxy: RpcProxy, index: int) -> None:
        self.index = index
        self._proxy = proxy
        self._head: int | None = None

    def call(self, method: str, params: list[Any]) -> Any:
        answer = self._proxy.forward(
            self.index, [{"jsonrpc": "2.0", "id": 0, "method": method, "params": params}]
        )[0]
        if "error" in answer:
            raise UpstreamError(f"{method}: {answer['error']}")
        return answer.get("result")

    def head(self) -> int:
        if self._head is None:
            self._head = int(self.call("eth_blockNumber", []), 16)
        return self._head


class UpstreamError(RuntimeError):
    """The upstream failed while a fault asked it something; answered as HTTP 502."""


_ids = itertools.count(1)


@dataclass(eq=False)
class Fault:
    """One fault rule. Subclasses set ``kind`` and override `reply` (HTTP-level) or
    `answer` / `rewrite` (per call)."""

    kind: ClassVar[str] = "fault"
    methods: tuple[str, ...] = ()
    times: int | None = None
    upstream: int | None = None
    when: Predicate | None = field(default=None, repr=False)
    id: int = field(default_factory=lambda: next(_ids))
    fired: int = 0

    @staticmethod
    def of(kind: str, **options: Any) -> Fault:
        """A fault by kind name: ``Fault.of("rpc_error", code=-32005, message="...")``."""
        cls = FAULT_KINDS.get(kind)
        if cls is None:
            raise FaultSpecError(f"unknown fault kind {kind!r} (known: {', '.join(FAULT_KINDS)})")
        if "methods" in options:
            options["methods"] = tuple(options["methods"])
        try:
            return cls(**options)
        except TypeError as exc:
            raise FaultSpecError(f"fault {kind!r}: {exc}") from exc

    @staticmethod
    def from_json(spec: Mapping[str, Any]) -> Fault:
        if not isinstance(spec, Mapping) or not isinstance(spec.get("kind"), str):
            raise FaultSpecError('a fault is a JSON object with a "kind"')
        options = {k: v for k, v in spec.items() if k not in ("kind", "id", "fired", "when")}
        return Fault.of(spec["kind"], **options)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for name, value in vars(self).items():
            if name != "when":
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def matches(self, call: Call, upstream: int) -> bool:
        if self.upstream is not None and self.upstream != upstream:
            return False
        method = call.get("method")
        if self.methods and method not in self.methods:
            return False
        params = call.get("params")
        return self.when is None or self.when(
            str(method), params if isinstance(params, list) else []
        )

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    # hooks ---------------------------------------------------------------------------

    def reply(self, calls: list[Call]) -> HttpReply | None:
        """An answer for the whole HTTP request instead of forwarding it, or None."""
        return None

    def answer(self, call: Call, upstream: Upstream) -> Answer | None:
        """This call's answer without asking the upstream, or None to forward it."""
        return None

    def rewrite(self, call: Call, answer: Answer, upstream: Upstream) -> Answer | None:
        """A changed answer after forwarding, or None to leave it."""
        return None


def _error(call: Call, code: int, message: str, data: Any = None) -> Answer:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": call.get("id"), "error": error}


def _result(call: Call, value: Any) -> Answer:
    return {"jsonrpc": "2.0", "id": call.get("id"), "result": value}


# --- HTTP-level faults ---------------------------------------------------------------------


@dataclass(eq=False)
class HttpStatus(Fault):
    """An HTTP error status (429 with ``Retry-After``, 500, 502, 503, ...)."""

    kind: ClassVar[str] = "http_status"
    status: int = 503
    retry_after_s: int | None = None
    body: str = "upstream unavailable"

    def reply(self, calls: list[Call]) -> HttpReply:
        headers = (("retry-after", str(self.retry_after_s)),) if self.retry_after_s else ()
        return HttpReply(self.status, self.body.encode(), headers)


@dataclass(eq=False)
class Hang(Fault):
    """No answer for ``hang_s`` seconds, then the connection is closed."""

    kind: ClassVar[str] = "hang"
    hang_s: float = 30.0

    def reply(self, calls: list[Call]) -> HttpReply:
        return HttpReply(0, b"", delay_s=self.hang_s, drop=True)


@dataclass(eq=False)
class Truncated(Fault):
    """The upstream's answer cut short (status 200, half a JSON document)."""

    kind: ClassVar[str] = "truncated"


@dataclass(eq=False)
class NonJson(Fault):
    """Status 200 with a gateway's HTML page instead of JSON."""

    kind: ClassVar[str] = "non_json"
    body: str = "<html><body><h1>502 Bad Gateway</h1></body></html>"

    def reply(self, calls: list[Call]) -> HttpReply:
        return HttpReply(200, self.body.encode(), (("content-type", "text/html"),))


# --- per-call faults ------------------------------------------------------------------------


@dataclass(eq=False)
class RpcErrorFault(Fault):
    """A JSON-RPC error object for each matched call (e.g. Solana -32004, -32007), or with
    ``whole_request`` one error object (id null) for the whole request, as providers
    answer a rate-limited or refused batch."""

    kind: ClassVar[str] = "rpc_error"
    code: int = -32603
    message: str = "internal error"
    data: Any = None
    whole_request: bool = False

    def reply(self, calls: list[Call]) -> HttpReply | None:
        if not self.whole_request:
            return None
        body = _error({"id": None}, self.code, self.message, self.data)
        return HttpReply(200, json.dumps(body).encode())

    def answer(self, call: Call, upstream: Upstream) -> Answer:
        return _error(call, self.code, self.message, self.data)


@dataclass(eq=False)
class ResultFault(Fault):
    """A fixed result for each matched call: ``null`` for a block, receipt or transaction
    that exists, ``[]`` for a page that is not empty."""

    kind: ClassVar[str] = "result"
    value: Any = None

    def answer(self, call: Call, upstream: Upstream) -> Answer:
        return _result(call, self.value)


# Provider wordings of an eth_getLogs range or result refusal: (code, message template,
# whether it names a range that would work). {max} is the provider's block limit,
# {start}/{end} the suggested range.
RANGE_WORDINGS: dict[str, tuple[int, str, bool]] = {
    "alchemy": (
        -32602,
        "Log response size exceeded. You can make eth_getLogs requests with up to a {max} "
        "block range and no limit on the response size, or you can request any block range "
        "with a cap of 10K logs in the response. Based on your parameters, this block range "
        "should work: [{start}, {end}]",
        True,
    ),
    "infura": (
        -32005,
        "query returned more than 10000 results. Try with this block range [{start}, {end}].",
        True,
    ),
    "infura_plain": (-32005, "query returned more than 10000 results", False),
    "quicknode": (-32602, "eth_getLogs is limited to a {max} range", False),
    "geth": (-32000, "exceed maximum block range: {max}", False),
    "ankr": (-32600, "block range is too wide", False),
    "drpc": (-32600, "ranges over {max} blocks are not supported on freetier", False),
    "llamarpc": (-32000, "block range too large", False),
}


def _block_param(value: Any, head: int) -> int | None:
    """A block number from a JSON-RPC block parameter (tags resolved against ``head``)."""
    if isinstance(value, str):
        if value.startswith("0x"):
            return int(value, 16)
        if value in ("latest", "pending", "safe", "finalized"):
            return head
        if value == "earliest":
            return 0
    return None


@dataclass(eq=False)
class RangeRefusal(Fault):
    """eth_getLogs over more than ``max_blocks`` blocks is refused in a provider's words
    (`RANGE_WORDINGS`); those that suggest a range suggest ``max_blocks`` from the start."""

    kind: ClassVar[str] = "range_refusal"
    wording: str = "alchemy"
    max_blocks: int = 1

    def __post_init__(self) -> None:
        if self.wording not in RANGE_WORDINGS:
            raise FaultSpecError(
                f"range_refusal: unknown wording {self.wording!r} "
                f"(known: {', '.join(RANGE_WORDINGS)})"
            )
        if self.max_blocks < 1:
            raise FaultSpecError("range_refusal: max_blocks must be >= 1")
        if not self.methods:
            self.methods = ("eth_getLogs",)

    def answer(self, call: Call, upstream: Upstream) -> Answer | None:
        params = call.get("params") or [{}]
        query = params[0] if isinstance(params[0], dict) else {}
        if "blockHash" in query:
            return None
        head = upstream.head()
        start = _block_param(query.get("fromBlock", "latest"), head)
        end = _block_param(query.get("toBlock", "latest"), head)
        if start is None or end is None or end - start + 1 <= self.max_blocks:
            return None
        code, template, _ = RANGE_WORDINGS[self.wording]
        message = template.format(
            max=self.max_blocks, start=hex(start), end=hex(start + self.max_blocks - 1)
        )
        return _error(call, code, message)


@dataclass(eq=False)
class HeadLogsIncomplete(Fault):
    """eth_getLogs over a range reaching the upstream's newest block answers without that
    block's logs (the node has the header; its logs are indexed a moment later)."""

    kind: ClassVar[str] = "head_logs_incomplete"

    def __post_init__(self) -> None:
        if not self.methods:
            self.methods = ("eth_getLogs",)

    def rewrite(self, call: Call, answer: Answer, upstream: Upstream) -> Answer | None:
        logs = answer.get("result")
        if not isinstance(logs, list):
            return None
        head = upstream.head()
        kept = [entry for entry in logs if int(entry.get("blockNumber", "0x0"), 16) < head]
        if len(kept) == len(logs):
            return None
        return _result(call, kept)


_BLOCK_READS = ("eth_getBlockByNumber", "eth_getBlockByHash")
_TX_READS = ("eth_getTransactionReceipt", "eth_getTransactionByHash")


@dataclass(eq=False)
class NodeBehind(Fault):
    """The upstream as a replica ``blocks`` behind: eth_blockNumber, blocks, logs,
    receipts and transactions end ``blocks`` below its real head."""

    kind: ClassVar[str] = "node_behind"
    blocks: int = 5

    def _cap(self, upstream: Upstream) -> int:
        return max(0, upstream.head() - self.blocks)

    def answer(self, call: Call, upstream: Upstream) -> Answer | None:
        method = call.get("method")
        params = call.get("params") or []
        if method == "eth_blockNumber":
            return _result(call, hex(self._cap(upstream)))
        if method == "eth_getBlockByNumber" and params:
            cap = self._cap(upstream)
            number = _block_param(params[0], upstream.head())
            if number is not None and number > cap:
                if params[0] in ("latest", "pending"):
                    call["params"] = [hex(cap), *params[1:]]
                    return None
                return _result(call, None)
        return None

    def rewrite(self, call: Call, answer: Answer, upstream: Upstream) -> Answer | None:
        method = call.get("method")
        value = answer.get("result")
        cap = self._cap(upstream)
        if method == "eth_getLogs" and isinstance(value, list):
            kept = [e for e in value if int(e.get("blockNumber", "0x0"), 16) <= cap]
            return None if len(kept) == len(value) else _result(call, kept)
        if (method in _BLOCK_READS or method in _TX_READS) and isinstance(value, dict):
            number = value.get("number" if method in _BLOCK_READS else "blockNumber")
            if isinstance(number, str) and int(number, 16) > cap:
                return _result(call, None)
        return None


def fork_hash(block_hash: str) -> str:
    """The hash the other fork's block at the same height has (`OtherFork`)."""
    return "0x" + keccak(bytes.fromhex(block_hash[2:]) + b"other fork").hex()


@dataclass(eq=False)
class OtherFork(Fault):
    """The upstream as a replica on another fork from ``from_block`` up (default: ``depth``
    blocks below the head when the fault first fires): blocks, logs, receipts and
    transactions there carry other block hashes (`fork_hash`), consistently linked."""

    kind: ClassVar[str] = "other_fork"
    from_block: int | None = None
    depth: int = 3

    def _forked(self, number: int, upstream: Upstream) -> bool:
        if self.from_block is None:
            self.from_block = max(1, upstream.head() - self.depth)
        return number >= self.from_block

    def rewrite(self, call: Call, answer: Answer, upstream: Upstream) -> Answer | None:
        value = answer.get("result")
        method = call.get("method")
        if method in _BLOCK_READS and isinstance(value, dict):
            number = int(value["number"], 16)
            if not self._forked(number, upstream):
                return None
            block = {**value, "hash": fork_hash(value["hash"])}
            if self._forked(number - 1, upstream):
                block["parentHash"] = fork_hash(value["parentHash"])
            return _result(call, block)
        if method == "eth_getLogs" and isinstance(value, list):
            logs = [
                {**e, "blockHash": fork_hash(e["blockHash"])}
                if self._forked(int(e["blockNumber"], 16), upstream)
                else e
                for e in value
            ]
            return None if logs == value else _result(call, logs)
        if method not in _TX_READS or not isinstance(value, dict):
            return None
        tx_block = value.get("blockNumber")
        if isinstance(tx_block, str) and self._forked(int(tx_block, 16), upstream):
            return _result(call, {**value, "blockHash": fork_hash(value["blockHash"])})
        return None


FAULT_KINDS: dict[str, type[Fault]] = {
    cls.kind: cls
    for cls in (
        HttpStatus,
        Hang,
        Truncated,
        NonJson,
        RpcErrorFault,
        ResultFault,
        RangeRefusal,
        HeadLogsIncomplete,
        NodeBehind,
        OtherFork,
    )
}


# --- the proxy --------------------------------------------------------------------------------


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Built once: httpx builds one per client otherwise (~60 ms each, a test starts many).
    return httpx.create_ssl_context()


class RpcProxy:
    """The proxy server. ``upstreams`` are JSON-RPC URLs; ``mode`` "first" sends every
    request to the first, "round_robin" to each in turn, "random" to one picked with a
    generator seeded by ``seed``."""

    def __init__(
        self,
        upstreams: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: str = "first",
        seed: int = 0,
        upstream_timeout_s: float = 10.0,
    ) -> None:
        if not upstreams:
            raise ValueError("RpcProxy needs at least one upstream URL")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.upstreams = list(upstreams)
        self.mode = mode
        self.requests = 0
        self.calls: Counter[str] = Counter()
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._turn = 0
        self._random = random.Random(seed)
        self._released = threading.Event()
        self._client = httpx.Client(
            timeout=httpx.Timeout(upstream_timeout_s),
            headers={"content-type": "application/json"},
            verify=_tls_context(),
        )
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="rpc-proxy",
            daemon=True,
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def control_url(self) -> str:
        return self.url + CONTROL_PREFIX

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> RpcProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()  # hung requests return at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._client.close()

    def __enter__(self) -> RpcProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # faults --------------------------------------------------------------------------------

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        log.info("proxy_fault_added", fault=fault.to_json())
        return fault

    def remove(self, fault_id: int) -> bool:
        with self._lock:
            before = len(self._faults)
            self._faults = [f for f in self._faults if f.id != fault_id]
            return len(self._faults) != before

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "calls": dict(self.calls),
                "faults": [f.to_json() for f in self._faults],
            }

    # request handling ----------------------------------------------------------------------

    def _pick_upstream(self) -> int:
        with self._lock:
            self.requests += 1
            if self.mode == "first":
                return 0
            if self.mode == "random":
                return self._random.randrange(len(self.upstreams))
            index = self._turn % len(self.upstreams)
            self._turn += 1
            return index

    def _fire(self, fault: Fault) -> None:
        with self._lock:
            fault.fired += 1
            if fault.exhausted and fault in self._faults:
                self._faults.remove(fault)

    def _active(self, calls: list[Call], upstream: int) -> list[tuple[Fault, list[int]]]:
        """The live faults that match some of ``calls``, with the positions they match."""
        active = []
        for fault in self.faults():
            positions = [i for i, c in enumerate(calls) if fault.matches(c, upstream)]
            if positions and not fault.exhausted:
                active.append((fault, positions))
        return active

    def forward(self, upstream: int, calls: list[Call]) -> list[Answer]:
        """Send ``calls`` as one batch to an upstream; answers in the calls' order."""
        response = self._client.post(self.upstreams[upstream], content=json.dumps(calls))
        payload = response.json()
        if not isinstance(payload, list):
            # A node answering a batch with one error object (e.g. batch refused).
            return [payload for _ in calls]
        by_id = {item.get("id"): item for item in payload if isinstance(item, dict)}
        return [by_id.get(c.get("id"), _error(c, -32603, "no answer upstream")) for c in calls]

    def handle(self, body: bytes) -> HttpReply:
        try:
            parsed = json.loads(body)
        except ValueError:
            return HttpReply(400, b'{"error": "request body is not JSON"}')
        single = isinstance(parsed, dict)
        calls: list[Call] = [parsed] if single else parsed
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            return HttpReply(400, b'{"error": "expected a JSON-RPC call or a batch of calls"}')
        upstream = Upstream(self, self._pick_upstream())
        with self._lock:
            self.calls.update(str(c.get("method")) for c in calls)
        active = self._active(calls, upstream.index)
        truncate = False
        for fault, _ in active:
            if isinstance(fault, Truncated):
                truncate = True
                self._fire(fault)
                continue
            reply = fault.reply(calls)
            if reply is not None:
                self._fire(fault)
                return reply
        try:
            answers = self._answers(calls, upstream, active)
        except (httpx.HTTPError, ValueError, UpstreamError) as exc:
            return HttpReply(502, json.dumps({"error": f"upstream failed: {exc}"}).encode())
        document = json.dumps(answers[0] if single else answers).encode()
        if truncate:
            document = document[: max(1, len(document) // 2)]
        return HttpReply(200, document, (("content-type", "application/json"),))

    def _answers(
        self, calls: list[Call], upstream: Upstream, active: list[tuple[Fault, list[int]]]
    ) -> list[Answer]:
        """Each call's answer: from the first fault that answers it, else forwarded (in one
        batch) and then possibly rewritten by the faults that match it."""
        answers: list[Answer | None] = [None] * len(calls)
        for fault, positions in active:
            changed = False
            for i in positions:
                if answers[i] is None:
                    answers[i] = fault.answer(calls[i], upstream)
                    changed = changed or answers[i] is not None
            if changed:
                self._fire(fault)
        pending = [i for i, a in enumerate(answers) if a is None]
        if pending:
            forwarded = self.forward(upstream.index, [calls[i] for i in pending])
            for i, answer in zip(pending, forwarded, strict=True):
                answers[i] = answer
            for fault, positions in active:
                changed = False
                for i in positions:
                    current = answers[i]
                    if i in pending and current is not None:
                        rewritten = fault.rewrite(calls[i], current, upstream)
                        if rewritten is not None:
                            answers[i] = rewritten
                            changed = True
                if changed:
                    self._fire(fault)
        return [a for a in answers if a is not None]

    def wait_released(self, delay_s: float) -> None:
        self._released.wait(delay_s)

    # control endpoint ------------------------------------------------------------------------

    def control(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        rest = path[len(CONTROL_PREFIX) :].rstrip("/")
        if rest == "/stats" and method == "GET":
            return 200, self.stats()
        if rest == "/faults" and method == "GET":
            return 200, [f.to_json() for f in self.faults()]
        if rest == "/faults" and method == "POST":
            try:
                fault = self.add(Fault.from_json(json.loads(body or b"null")))
            except (ValueError, FaultSpecError) as exc:
                return 400, {"error": str(exc)}
            return 201, fault.to_json()
        if rest == "/faults" and method == "DELETE":
            self.clear()
            return 200, {"cleared": True}
        if rest.startswith("/faults/") and method == "DELETE":
            try:
                fault_id = int(rest.removeprefix("/faults/"))
            except ValueError:
                return 400, {"error": "fault id must be an integer"}
            if self.remove(fault_id):
                return 200, {"removed": fault_id}
            return 404, {"error": f"no fault with id {fault_id}"}
        return 404, {"error": f"unknown control path {path} for {method}"}


def _handler_for(proxy: RpcProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: without this, Nagle's algorithm and the
        # client's delayed ACK hold every answer back ~40 ms.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _body(self) -> bytes:
            length = int(self.headers.get("content-length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, reply: HttpReply) -> None:
            if reply.delay_s:
                proxy.wait_released(reply.delay_s)
            if reply.drop:
                self.close_connection = True
                return
            self.send_response(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            if not any(name == "content-type" for name, _ in reply.headers):
                self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)

        def _control(self, method: str) -> None:
            status, payload = proxy.control(method, self.path, self._body())
            self._send(HttpReply(status, json.dumps(payload).encode()))

        def do_GET(self) -> None:
            if self.path.startswith(CONTROL_PREFIX):
                self._control("GET")
            else:
                self._send(HttpReply(405, b'{"error": "JSON-RPC takes POST"}'))

        def do_DELETE(self) -> None:
            self._control("DELETE")

        def do_POST(self) -> None:
            if self.path.startswith(CONTROL_PREFIX):
                self._control("POST")
                return
            self._send(proxy.handle(self._body()))

    return Handler
