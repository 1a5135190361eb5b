"""Typed errors raised by the chain RPC clients (EVM and Solana).

Callers act on the class: retry later (``RpcUnavailable``, ``NodeBehind``), shrink
the scan window (``RangeTooLarge``), or treat the request as wrong (``RpcError``).
"""

from __future__ import annotations


class RpcError(Exception):
    """Base of the RPC errors. Raised as itself: the node refused the request (bad
    params, unknown method, rejected transaction) and retrying it unchanged will not help."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class RpcUnavailable(RpcError):
    """Every configured endpoint failed (timeouts, connection errors, 429/5xx, garbage)
    after the bounded retries. Retry the whole operation on the next poll.

    ``timed_out`` is True when every failed attempt was a timeout: for a log query that
    usually means the range is too heavy for the provider, so shrink the window too.
    """

    def __init__(self, message: str, *, code: int | None = None, timed_out: bool = False) -> None:
        super().__init__(message, code=code)
        self.timed_out = timed_out


class RangeTooLarge(RpcError):
    """The provider refused the block range of a log query.

    ``suggested_to_block`` is the last block of a range the provider said it would
    accept (starting at the same ``from_block``), or ``None``: then halve the window.
    """

    def __init__(
        self, message: str, *, suggested_to_block: int | None = None, code: int | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.suggested_to_block = suggested_to_block


class NodeBehind(RpcError):
    """The node has not got (or disagrees about) a block the request needs, e.g. a
    load-balanced replica that lags. Retry later; never advance a cursor past it."""


class SlotSkipped(RpcError):
    """The node says no block was produced in this slot (-32007 / -32009). Not an error
    to retry: move on to the next slot."""


class BlockNotAvailable(RpcError):
    """The block is not available yet at the requested commitment (-32004 / -32014).
    Retry on a later poll; never advance a cursor past it."""


class HistoryPruned(RpcError):
    """The node no longer has the block or history asked for (-32001: cleaned up below its
    first available block). Another endpoint (an archival one) may; never skip past it."""
