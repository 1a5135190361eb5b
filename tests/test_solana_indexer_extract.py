"""extract_deposits: which balance changes of one Solana transaction are deposits."""

from __future__ import annotations

from typing import Any

from escrowd.indexer.solana_deposits import USDC_INDEX_OFFSET, BalanceDeposit, extract_deposits
from escrowd.indexer.solana_source import SolanaTransaction, TokenBalanceEntry

USDC_MINT = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"
FAKE_MINT = "FakeUsdc1111111111111111111111111111111111"
TOKEN_PROGRAM = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"
WATCHED = "Wat1111111111111111111111111111111111111111"
WATCHED_ATA = "WatAta11111111111111111111111111111111111"
PAYER = "Payer111111111111111111111111111111111111"
PAYER_ATA = "PayerAta1111111111111111111111111111111111"
STRANGER = "Stranger11111111111111111111111111111111"


def token(index: int, owner: str, amount: int, mint: str = USDC_MINT) -> TokenBalanceEntry:
    return TokenBalanceEntry(index, mint, owner, TOKEN_PROGRAM, amount, 6)


def tx(
    keys: list[str],
    pre: list[int],
    post: list[int],
    pre_tokens: tuple[TokenBalanceEntry, ...] = (),
    post_tokens: tuple[TokenBalanceEntry, ...] = (),
    err: Any = None,
) -> SolanaTransaction:
    return SolanaTransaction(
        signature="sig1",
        slot=42,
        block_time=None,
        err=err,
        fee_lamports=5000,
        account_keys=tuple(keys),
        pre_balances=tuple(pre),
        post_balances=tuple(post),
        pre_token_balances=pre_tokens,
        post_token_balances=post_tokens,
    )


def watched(address: str) -> bool:
    return address == WATCHED


def test_sol_received_is_a_deposit_keyed_by_account_index() -> None:
    found = extract_deposits(
        tx([PAYER, STRANGER, WATCHED], [10**9, 0, 5], [10**9 - 2_005_000, 0, 2_000_005]),
        watched,
        USDC_MINT,
    )
    assert found == [BalanceDeposit("sig1", 2, "SOL", WATCHED, 2_000_000, PAYER, 42)]


def test_failed_transaction_credits_nothing() -> None:
    failed = tx(
        [PAYER, WATCHED],
        [10**9, 0],
        [10**9, 7],
        post_tokens=(token(1, WATCHED, 9),),
        err={"InstructionError": [0, {"Custom": 1}]},
    )
    assert extract_deposits(failed, watched, USDC_MINT) == []


def test_watched_wallet_paying_a_fee_or_sending_out_is_not_a_deposit() -> None:
    sending = tx(
        [WATCHED, WATCHED_ATA, PAYER_ATA],
        [10**9, 2_039_280, 2_039_280],
        [10**9 - 5000, 2_039_280, 2_039_280],
        pre_tokens=(token(1, WATCHED, 5_000_000), token(2, PAYER, 0)),
        post_tokens=(token(1, WATCHED, 4_000_000), token(2, PAYER, 1_000_000)),
    )
    assert extract_deposits(sending, watched, USDC_MINT) == []


def test_usdc_attributed_by_owner_even_when_the_wallet_is_not_listed() -> None:
    # An SPL transfer lists the owner's token account, not the owner wallet.
    transfer = tx(
        [PAYER, PAYER_ATA, WATCHED_ATA, USDC_MINT],
        [10**9, 2_039_280, 2_039_280, 1],
        [10**9 - 5000, 2_039_280, 2_039_280, 1],
        pre_tokens=(token(1, PAYER, 7_000_000), token(2, WATCHED, 1_000_000)),
        post_tokens=(token(1, PAYER, 4_500_000), token(2, WATCHED, 3_500_000)),
    )
    found = extract_deposits(transfer, watched, USDC_MINT)
    assert found == [
        BalanceDeposit("sig1", USDC_INDEX_OFFSET + 2, "USDC", WATCHED, 2_500_000, PAYER, 42)
    ]


def test_new_token_account_counts_from_zero_and_other_mints_are_ignored() -> None:
    minted = tx(
        [PAYER, WATCHED_ATA, STRANGER],
        [10**9, 0, 0],
        [10**9, 2_039_280, 2_039_280],
        post_tokens=(token(1, WATCHED, 1_000_000), token(2, WATCHED, 9_000_000, mint=FAKE_MINT)),
    )
    found = extract_deposits(minted, watched, USDC_MINT)
    # The token account's rent lamports are not a SOL deposit: only the wallet's are.
    assert [(d.symbol, d.index, d.amount_base_units, d.from_address) for d in found] == [
        ("USDC", USDC_INDEX_OFFSET + 1, 1_000_000, None)
    ]


def test_unwatched_owner_and_sol_to_unwatched_are_ignored() -> None:
    other = tx(
        [PAYER, STRANGER],
        [10**9, 0],
        [10**9 - 1_005_000, 1_000_000],
        post_tokens=(token(1, STRANGER, 5),),
    )
    assert extract_deposits(other, watched, USDC_MINT) == []


def test_sol_and_usdc_in_one_transaction_get_distinct_indexes() -> None:
    both = tx(
        [PAYER, WATCHED, WATCHED_ATA],
        [10**9, 100, 2_039_280],
        [10**9 - 1_005_000, 1_000_100, 2_039_280],
        pre_tokens=(token(2, WATCHED, 0),),
        post_tokens=(token(2, WATCHED, 3),),
    )
    found = extract_deposits(both, watched, USDC_MINT)
    assert [(d.symbol, d.index, d.amount_base_units) for d in found] == [
        ("SOL", 1, 1_000_000),
        ("USDC", USDC_INDEX_OFFSET + 2, 3),
    ]
