"""What real Solana RPC providers do wrong, as switches of the local simulator.

A load-balanced provider answers from replicas at different heights, answers ``null`` for
a status, transaction or block that exists, answers ``[]`` to ``getSignaturesForAddress``
with ``before=`` when the replica lacks that signature, throttles with HTTP 429 and
``Retry-After``, and answers the custom error codes of a node (-32001 block cleaned up,
-32004 block not available, -32007 slot skipped, -32009 missing in long-term storage,
-32014 block status not yet available, -32016 minimum context slot not reached) where a
perfect node would not. ``SolanaFaults`` holds the switches; the simulator consults it
on every request. Tests flip them in process (``sim.faults``), operators over HTTP
(``GET``/``PUT``/``DELETE /simulator/faults``) or at start (``escrowd devnet solana
--faults JSON``), with the same JSON:

    {"lag_slots": 5, "lag_alternate": true,
     "rules": [{"kind": "null", "methods": ["getTransaction"], "count": 3},
               {"kind": "error", "methods": ["getBlock"], "code": -32009, "every": 2},
               {"kind": "http_429", "retry_after_s": 1, "count": 2}]}

A rule acts on every ``every``-th request it matches, ``count`` times (absent: until it
is removed); ``methods`` absent means every method.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

KINDS = ("null", "empty_before", "error", "http_429")
# Methods whose answer a replica may wrongly give as null (statuses: each entry).
NULLABLE_METHODS = frozenset({"getSignatureStatuses", "getTransaction", "getBlock"})
ERROR_CODES = frozenset({-32001, -32004, -32007, -32009, -32014, -32016})


class FaultSpecError(ValueError):
    """A fault switch that cannot be applied; the message says which field is wrong."""


@dataclass
class FaultRule:
    kind: str
    methods: frozenset[str] | None = None
    code: int | None = None
    count: int | None = None
    every: int = 1
    retry_after_s: int = 1
    matched: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FaultSpecError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.kind == "null" and (self.methods is None or not self.methods <= NULLABLE_METHODS):
            raise FaultSpecError(f"null faults need methods among {sorted(NULLABLE_METHODS)}")
        if self.kind == "error" and self.code not in ERROR_CODES:
            raise FaultSpecError(f"error faults need a code among {sorted(ERROR_CODES)}")
        if self.kind != "error" and self.code is not None:
            raise FaultSpecError("only error faults take a code")
        if self.every < 1 or (self.count is not None and self.count < 1):
            raise FaultSpecError("every and count must be at least 1")
        if self.retry_after_s < 0:
            raise FaultSpecError("retry_after_s must not be negative")

    def matches(self, method: str) -> bool:
        if self.kind == "empty_before" and method != "getSignaturesForAddress":
            return False
        return self.methods is None or method in self.methods

    def to_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": self.kind, "every": self.every}
        if self.methods is not None:
            spec["methods"] = sorted(self.methods)
        for name in ("code", "count"):
            if getattr(self, name) is not None:
                spec[name] = getattr(self, name)
        if self.kind == "http_429":
            spec["retry_after_s"] = self.retry_after_s
        return spec

    @classmethod
    def from_json(cls, spec: Any) -> FaultRule:
        if not isinstance(spec, dict):
            raise FaultSpecError("each rule is an object")
        unknown = set(spec) - {"kind", "methods", "code", "count", "every", "retry_after_s"}
        if unknown:
            raise FaultSpecError(f"unknown rule fields: {', '.join(sorted(unknown))}")
        methods = spec.get("methods")
        if methods is not None and (
            not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)
        ):
            raise FaultSpecError("methods is a list of JSON-RPC method names")
        for name in ("code", "count", "every", "retry_after_s"):
            value = spec.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise FaultSpecError(f"{name} must be an integer")
        return cls(
            kind=str(spec.get("kind")),
            methods=None if methods is None else frozenset(methods),
            code=spec.get("code"),
            count=spec.get("count"),
            every=spec.get("every", 1),
            retry_after_s=spec.get("retry_after_s", 1),
        )


class SolanaFaults:
    """The simulator's fault switches; thread-safe (the HTTP server is threaded).

    ``lag_slots``: answers come from a replica that many slots behind the tip (its
    processed, confirmed and finalized slots, transactions, blocks and account states).
    ``lag_alternate``: a load balancer: every other request goes to that replica, the
    others to an up-to-date one. ``injected`` counts the faults applied, by kind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lag_slots = 0
        self.lag_alternate = False
        self.rules: list[FaultRule] = []
        self.injected: Counter[str] = Counter()
        self._requests = 0

    def set_lag(self, lag_slots: int, *, alternate: bool = False) -> None:
        if lag_slots < 0:
            raise FaultSpecError("lag_slots must not be negative")
        with self._lock:
            self.lag_slots = lag_slots
            self.lag_alternate = alternate
            self._requests = 0

    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.lag_slots = 0
            self.lag_alternate = False

    def behind_slots(self) -> int:
        """How far behind the replica answering this request is."""
        with self._lock:
            self._requests += 1
            if self.lag_slots and self.lag_alternate and self._requests % 2 == 0:
                return 0
            if self.lag_slots:
                self.injected["lag"] += 1
            return self.lag_slots

    def take(self, kind: str, method: str) -> FaultRule | None:
        """The rule of `kind` that acts on this request to `method`, if any (counted)."""
        with self._lock:
            for rule in self.rules:
                if rule.kind != kind or not rule.matches(method):
                    continue
                rule.matched += 1
                if rule.matched % rule.every:
                    continue
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count == 0:
                        self.rules.remove(rule)
                self.injected[kind] += 1
                return rule
            return None

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "lag_slots": self.lag_slots,
                "lag_alternate": self.lag_alternate,
                "rules": [rule.to_json() for rule in self.rules],
                "injected": dict(self.injected),
            }

    def configure(self, spec: Any) -> None:
        """Replace every switch with those of `spec` (the JSON form); on a bad spec
        nothing changes."""
        if not isinstance(spec, dict):
            raise FaultSpecError("the fault configuration is a JSON object")
        unknown = set(spec) - {"lag_slots", "lag_alternate", "rules"}
        if unknown:
            raise FaultSpecError(f"unknown fields: {', '.join(sorted(unknown))}")
        lag = spec.get("lag_slots", 0)
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
            raise FaultSpecError("lag_slots must be a non-negative integer")
        alternate = spec.get("lag_alternate", False)
        if not isinstance(alternate, bool):
            raise FaultSpecError("lag_alternate must be true or false")
        raw_rules = spec.get("rules", [])
        if not isinstance(raw_rules, list):
            raise FaultSpecError("rules is a list")
        rules = [FaultRule.from_json(item) for item in raw_rules]
        with self._lock:
            self.lag_slots, self.lag_alternate, self._requests = lag, alternate, 0
            self.rules = rules


def error_message(code: int, slot: int, first_available: int) -> tuple[str, Any]:
    """A node's message (and data) for a custom error code about `slot`."""
    if code == -32001:
        return (
            f"Block {slot} cleaned up, does not exist on node. First available block: "
            f"{first_available}",
            None,
        )
    if code == -32004:
        return f"Block not available for slot {slot}", None
    if code == -32007:
        return f"Slot {slot} was skipped, or missing due to ledger jump to recent snapshot", None
    if code == -32009:
        return f"Slot {slot} was skipped, or missing in long-term storage", None
    if code == -32014:
        return f"Block status not yet available for slot {slot}", None
    assert code == -32016
    return "Minimum context slot has not been reached", {"contextSlot": slot}
