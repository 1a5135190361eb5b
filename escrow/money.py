"""Decimal strings at the edges, integers in base units everywhere else, and the exact
conversion between a chain token's base units and the ledger's (one scale per asset)."""

from __future__ import annotations

import re

from escrowd.escrow.errors import InvalidAmount

_DECIMAL = re.compile(r"^(?P<whole>0|[1-9][0-9]*)(?:\.(?P<frac>[0-9]+))?$")
# Base units must fit a signed 64-bit column.
MAX_BASE_UNITS = 2**63 - 1


def parse_amount(text: str, decimals: int, *, field: str = "amount") -> int:
    """Parse "12.5" into base units (12500000 for 6 decimals); reject anything ambiguous."""
    if not isinstance(text, str):
        raise InvalidAmount(f'{field} must be a decimal string such as "12.5", got {text!r}')
    # Bounded before parsing: int() of thousands of digits is slow and raises ValueError.
    match = _DECIMAL.match(text) if len(text) <= 40 else None
    if match is None:
        raise InvalidAmount(
            f"{field} {text!r} is not a plain decimal number: use digits with an optional "
            "'.', no sign, exponent, spaces or separators"
        )
    frac = match.group("frac") or ""
    if len(frac) > decimals:
        raise InvalidAmount(
            f"{field} {text!r} has {len(frac)} decimal places; this asset has {decimals}"
        )
    scale: int = 10**decimals
    base_units = int(match.group("whole")) * scale + int(frac.ljust(decimals, "0") or "0")
    if base_units <= 0:
        raise InvalidAmount(f"{field} must be greater than zero, got {text!r}")
    if base_units > MAX_BASE_UNITS:
        raise InvalidAmount(f"{field} {text!r} is too large")
    return base_units


def format_amount(base_units: int, decimals: int) -> str:
    """12500000 with 6 decimals -> "12.5"; exact, no trailing zeros."""
    sign = "-" if base_units < 0 else ""
    whole, frac = divmod(abs(base_units), 10**decimals)
    if decimals == 0 or frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{str(frac).rjust(decimals, '0').rstrip('0')}"


def to_ledger_units(chain_units: int, chain_decimals: int, ledger_decimals: int) -> tuple[int, int]:
    """An on-chain amount in ledger base units, and the remainder (in chain base units)
    too small for one ledger unit: 10**19 at 18 decimals -> (10**7, 0) at 6. Exact:
    ``ledger * 10**(chain - ledger decimals) + remainder == chain_units``; nothing is
    rounded up, the remainder is the caller's to hold or refuse."""
    assert chain_units >= 0
    factor: int = 10 ** abs(chain_decimals - ledger_decimals)
    if chain_decimals >= ledger_decimals:
        return divmod(chain_units, factor)
    return chain_units * factor, 0


def to_chain_units(ledger_units: int, chain_decimals: int, ledger_decimals: int) -> int:
    """A ledger amount in the chain token's base units; InvalidAmount when the token is
    too coarse to carry it exactly."""
    assert ledger_units >= 0
    factor: int = 10 ** abs(chain_decimals - ledger_decimals)
    if chain_decimals >= ledger_decimals:
        return ledger_units * factor
    whole, rest = divmod(ledger_units, factor)
    if rest:
        raise InvalidAmount(
            f"{ledger_units} ledger base units cannot be paid exactly by a token with "
            f"{chain_decimals} decimals; use a multiple of {factor}"
        )
    return whole
