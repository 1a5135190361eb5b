"""Address validation: EIP-55, hex, lengths, zero address; base58 Solana keys; USDC ATAs."""

from __future__ import annotations

import pytest
from solders.pubkey import Pubkey
from spl.token.instructions import get_associated_token_address

from escrowd.wallets.addresses import (
    associated_token_address,
    validate_evm_address,
    validate_evm_destination,
    validate_solana_address,
)
from escrowd.wallets.errors import InvalidAddress

# EIP-55 reference examples.
EIP55 = [
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
    "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
]
USDC_MINT = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"


@pytest.mark.parametrize("address", EIP55)
def test_eip55_addresses_are_accepted_in_every_unambiguous_case(address: str) -> None:
    assert validate_evm_address(address) == address
    assert validate_evm_address(address.lower()) == address
    assert validate_evm_address("0x" + address[2:].upper()) == address


@pytest.mark.parametrize("address", EIP55)
def test_a_single_flipped_case_fails_the_checksum(address: str) -> None:
    position = next(i for i, c in enumerate(address) if i > 1 and c.isalpha())
    flipped = address[:position] + address[position].swapcase() + address[position + 1 :]
    with pytest.raises(InvalidAddress, match="checksum"):
        validate_evm_address(flipped)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "start with 0x"),
        ("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAe", "got 39"),
        ("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed00", "got 42"),
        ("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeg", "not hex"),
        ("", "start with 0x"),
    ],
)
def test_malformed_evm_addresses_say_what_is_wrong(address: str, problem: str) -> None:
    with pytest.raises(InvalidAddress, match=problem) as info:
        validate_evm_address(address)
    assert info.value.chain == "evm"
    assert info.value.http_status == 400


def test_zero_address_is_refused_as_a_destination_only() -> None:
    zero = "0x" + "0" * 40
    assert validate_evm_address(zero) == zero
    with pytest.raises(InvalidAddress, match="zero address"):
        validate_evm_destination(zero)
    with pytest.raises(InvalidAddress, match="zero address"):
        validate_evm_address(zero, allow_zero=False)


def test_solana_addresses_must_be_canonical_base58_of_32_bytes() -> None:
    good = "HAgk14JpMQLgt6rVgv7cBQFJWFto5Dqxi472uT3DKpqk"
    assert validate_solana_address(good) == good
    assert validate_solana_address("11111111111111111111111111111111")
    with pytest.raises(InvalidAddress, match="not valid base58"):
        validate_solana_address("HAgk14JpMQLgt6rVgv7cBQFJWFto5Dqxi472uT3DKpq0")
    with pytest.raises(InvalidAddress, match="32 bytes, got 31"):
        validate_solana_address("HAgk14JpMQLgt6rVgv7cBQFJWFto5Dqxi472uT3DKp")
    with pytest.raises(InvalidAddress, match="32 bytes"):
        validate_solana_address(good + "k")
    with pytest.raises(InvalidAddress, match="non-empty"):
        validate_solana_address("")
    with pytest.raises(InvalidAddress, match="not valid base58"):
        validate_solana_address("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed")


def test_usdc_associated_token_account_matches_spl_reference() -> None:
    owner = "HAgk14JpMQLgt6rVgv7cBQFJWFto5Dqxi472uT3DKpqk"
    expected = get_associated_token_address(
        Pubkey.from_string(owner), Pubkey.from_string(USDC_MINT)
    )
    assert associated_token_address(owner, USDC_MINT) == str(expected)
    assert associated_token_address(owner, USDC_MINT) != owner
    with pytest.raises(InvalidAddress):
        associated_token_address("not-base58!", USDC_MINT)
