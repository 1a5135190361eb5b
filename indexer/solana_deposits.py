"""Which balance changes of one Solana transaction are deposits to watched wallets.

Pure: no I/O. SOL deposits come from the lamport pre/post balances of the watched wallet
itself; USDC deposits from the token balance entries whose *owner* is a watched wallet
and whose mint is the configured USDC mint (attributed by owner + mint, never by symbol).

Index scheme (the third part of the deposit key (chain, signature, index)): a SOL deposit
uses the wallet's account index in the transaction; a USDC deposit uses
``USDC_INDEX_OFFSET + the token account's index``. A transaction lists at most 256
account keys (u8 indexes, lookup tables included), so the two ranges cannot collide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from escrowd.indexer.solana_source import SolanaTransaction, TokenBalanceEntry

SOL_DECIMALS = 9
USDC_DECIMALS = 6
USDC_INDEX_OFFSET = 1000
MAX_ACCOUNT_KEYS = 256

Symbol = Literal["SOL", "USDC"]
SOL: Symbol = "SOL"
USDC: Symbol = "USDC"


@dataclass(frozen=True)
class BalanceDeposit:
    """A positive balance change of a watched wallet in one successful transaction."""

    signature: str
    index: int
    symbol: Symbol
    owner: str  # the watched wallet credited (for USDC, the token account's owner)
    amount_base_units: int
    from_address: str | None  # best guess: the account whose balance fell the most
    slot: int


def extract_deposits(
    tx: SolanaTransaction, is_watched_wallet: Callable[[str], bool], usdc_mint: str
) -> list[BalanceDeposit]:
    """SOL and USDC deposits of `tx` to wallets for which `is_watched_wallet` is true.

    Failed transactions credit nothing (only their fee moved). Decreases are not
    deposits: a watched wallet paying a fee or sending funds out shows a decrease.
    """
    if not tx.succeeded:
        return []
    assert len(tx.account_keys) <= MAX_ACCOUNT_KEYS, "more account keys than a message allows"
    assert len(tx.pre_balances) == len(tx.post_balances)
    found: list[BalanceDeposit] = []
    for index, (pre, post) in enumerate(zip(tx.pre_balances, tx.post_balances, strict=True)):
        key = tx.account_keys[index]
        if post > pre and is_watched_wallet(key):
            found.append(
                BalanceDeposit(
                    signature=tx.signature,
                    index=index,
                    symbol=SOL,
                    owner=key,
                    amount_base_units=post - pre,
                    from_address=_largest_sol_decrease(tx, exclude=index),
                    slot=tx.slot,
                )
            )
    pre_tokens = {entry.account_index: entry for entry in tx.pre_token_balances}
    for entry in tx.post_token_balances:
        if entry.mint != usdc_mint or entry.owner is None or not is_watched_wallet(entry.owner):
            continue
        before = pre_tokens.get(entry.account_index)
        pre_amount = before.amount_base_units if before and before.mint == usdc_mint else 0
        if entry.amount_base_units > pre_amount:
            found.append(
                BalanceDeposit(
                    signature=tx.signature,
                    index=USDC_INDEX_OFFSET + entry.account_index,
                    symbol=USDC,
                    owner=entry.owner,
                    amount_base_units=entry.amount_base_units - pre_amount,
                    from_address=_largest_token_decrease(tx, usdc_mint, pre_tokens),
                    slot=tx.slot,
                )
            )
    return found


def _largest_sol_decrease(tx: SolanaTransaction, *, exclude: int) -> str | None:
    best: tuple[int, str] | None = None
    for index, (pre, post) in enumerate(zip(tx.pre_balances, tx.post_balances, strict=True)):
        if index != exclude and post < pre and (best is None or pre - post > best[0]):
            best = (pre - post, tx.account_keys[index])
    return best[1] if best else None


def _largest_token_decrease(
    tx: SolanaTransaction, mint: str, pre_tokens: dict[int, TokenBalanceEntry]
) -> str | None:
    post_tokens = {entry.account_index: entry for entry in tx.post_token_balances}
    best: tuple[int, str] | None = None
    for index, before in pre_tokens.items():
        after = post_tokens.get(index)
        post_amount = after.amount_base_units if after else 0
        fell = before.amount_base_units - post_amount
        if before.mint == mint and fell > 0 and (best is None or fell > best[0]):
            best = (fell, before.owner or tx.account_keys[index])
    return best[1] if best else None
