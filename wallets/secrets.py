"""A wrapper for secret values whose repr and str never show the value."""

from __future__ import annotations

import hmac
from typing import Generic, NoReturn, TypeVar

T = TypeVar("T", str, bytes)

_REDACTED = "Secret('**********')"


class Secret(Generic[T]):
    """Holds a secret (mnemonic, seed, private key, passphrase).

    `repr`, `str` and formatting are redacted so a secret passed to a logger or an
    exception by mistake shows nothing. Pickling is refused so it cannot leak through
    a process pool or a cache. Call `reveal()` at the single point of use.
    """

    __slots__ = ("_value",)
    _value: T

    def __init__(self, value: T) -> None:
        self._value = value

    def reveal(self) -> T:
        return self._value

    def __repr__(self) -> str:
        return _REDACTED

    def __str__(self) -> str:
        return _REDACTED

    def __format__(self, format_spec: str) -> str:
        return _REDACTED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        a, b = self._value, other._value
        if isinstance(a, str) and isinstance(b, str):
            return hmac.compare_digest(a.encode(), b.encode())
        if isinstance(a, bytes) and isinstance(b, bytes):
            return hmac.compare_digest(a, b)
        return False

    def __hash__(self) -> int:
        # Secrets are not meant to be dict keys; a constant hash keeps them usable but
        # reveals nothing.
        return 0

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret values cannot be pickled")
