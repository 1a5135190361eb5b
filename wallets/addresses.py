"""Address formats: EIP-55 for EVM, base58 ed25519 public keys for Solana, and the
Solana associated token account (ATA) of an owner for a mint."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import base58
from solders.pubkey import Pubkey

from escrowd.wallets.errors import InvalidAddress

if TYPE_CHECKING:

    def keccak256(data: bytes) -> bytes: ...

else:
    try:
        # safe-pysha3 is a C implementation, about 6x faster than pycryptodome's wrapper;
        # address derivation does two Keccak hashes per address.
        from sha3 import keccak_256 as _sha3_keccak_256

        def keccak256(data: bytes) -> bytes:
            return _sha3_keccak_256(data).digest()

    except ImportError:
        from Crypto.Hash import keccak as _pycryptodome_keccak

        def keccak256(data: bytes) -> bytes:
            return _pycryptodome_keccak.new(data=data, digest_bits=256).digest()


EVM = "evm"
SOLANA = "solana"
EVM_ZERO_ADDRESS = "0x" + "00" * 20
# bytes.fromhex skips whitespace, so it alone would take "0x" + 38 digits + 2 spaces.
_HEX40 = re.compile(r"[0-9a-fA-F]{40}")

TOKEN_PROGRAM_ID = Pubkey.from_string("TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA")
ASSOCIATED_TOKEN_PROGRAM_ID = Pubkey.from_string("ATokenGPvbdGVxr1b2hvZbsiqW5xWH25efTNsLJA8knL")


def _build_checksum_table() -> tuple[str, ...]:
    # Entry (address_byte << 8 | hash_byte) is the two EIP-55 characters for that byte:
    # a hex letter is upper-cased when the matching nibble of the hash is >= 8. One
    # lookup per byte instead of per-character work keeps the xpub fast path fast.
    digits = "0123456789abcdef"
    table = []
    for a in range(256):
        high, low = digits[a >> 4], digits[a & 15]
        for h in range(256):
            table.append(
                (high.upper() if h >> 4 >= 8 else high) + (low.upper() if h & 15 >= 8 else low)
            )
    return tuple(table)


CHECKSUM_TABLE = _build_checksum_table()


def evm_checksum_address(address20: bytes) -> str:
    """EIP-55 mixed-case form of a 20-byte address."""
    if len(address20) != 20:
        raise InvalidAddress(
            f"EVM address must be 20 bytes, got {len(address20)}",
            chain=EVM,
            address=address20.hex(),
        )
    digest = keccak256(address20.hex().encode())
    table = CHECKSUM_TABLE
    return "0x" + "".join([table[(a << 8) | h] for a, h in zip(address20, digest, strict=False)])


def evm_address_from_public_key(uncompressed64: bytes) -> str:
    """EVM address of an uncompressed secp256k1 public key given without its 0x04 prefix."""
    assert len(uncompressed64) == 64
    return evm_checksum_address(keccak256(uncompressed64)[-20:])


def validate_evm_address(address: str, *, allow_zero: bool = True) -> str:
    """Check an EVM address and return its EIP-55 form.

    Accepts all-lowercase or all-uppercase hex (no checksum to check) and mixed case only
    when the EIP-55 checksum matches. `allow_zero=False` rejects the zero address, which
    is never a valid destination: funds sent there are burnt.
    """
    if not isinstance(address, str):
        raise InvalidAddress("EVM address must be a string", chain=EVM, address=repr(address))
    if not address.startswith("0x"):
        raise InvalidAddress(
            "EVM address must start with 0x followed by 40 hex digits", chain=EVM, address=address
        )
    body = address[2:]
    if len(body) != 40:
        raise InvalidAddress(
            f"EVM address must have 40 hex digits after 0x, got {len(body)}",
            chain=EVM,
            address=address,
        )
    if not _HEX40.fullmatch(body):
        raise InvalidAddress(
            "EVM address contains characters that are not hex digits", chain=EVM, address=address
        )
    raw = bytes.fromhex(body)
    checksummed = evm_checksum_address(raw)
    is_mixed_case = body != body.lower() and body != body.upper()
    if is_mixed_case and checksummed != address:
        raise InvalidAddress(
            "EVM address has an invalid EIP-55 checksum (mixed case does not match); "
            "re-copy the address from its source",
            chain=EVM,
            address=address,
        )
    if not allow_zero and raw == bytes(20):
        raise InvalidAddress(
            "the zero address cannot be a destination: funds sent there are lost",
            chain=EVM,
            address=address,
        )
    return checksummed


def validate_evm_destination(address: str) -> str:
    """`validate_evm_address` for addresses we send funds to (zero address refused)."""
    return validate_evm_address(address, allow_zero=False)


def validate_solana_address(address: str) -> str:
    """Check a Solana address: base58 that decodes to exactly 32 bytes. Returns it."""
    if not isinstance(address, str) or not address:
        raise InvalidAddress(
            "Solana address must be a non-empty base58 string",
            chain=SOLANA,
            address=repr(address),
        )
    try:
        raw = base58.b58decode(address)
    except ValueError:
        raise InvalidAddress(
            "Solana address is not valid base58 (allowed: 1-9, A-Z, a-z without 0, O, I, l)",
            chain=SOLANA,
            address=address,
        ) from None
    if len(raw) != 32:
        raise InvalidAddress(
            f"Solana address must decode to 32 bytes, got {len(raw)}",
            chain=SOLANA,
            address=address,
        )
    if base58.b58encode(raw).decode() != address:
        # Leading '1's encode zero bytes; a non-canonical spelling is a different string
        # for the same key and would defeat address-equality lookups.
        raise InvalidAddress(
            "Solana address is not in canonical base58 form", chain=SOLANA, address=address
        )
    return address


def associated_token_address(owner: str, mint: str) -> str:
    """The associated token account of `owner` for `mint` (SPL Token program).

    The Solana indexer watches this account: SPL transfers list the token account, not
    the owner wallet.
    """
    owner_key = Pubkey.from_string(validate_solana_address(owner))
    mint_key = Pubkey.from_string(validate_solana_address(mint))
    seeds: list[Any] = [bytes(owner_key), bytes(TOKEN_PROGRAM_ID), bytes(mint_key)]
    ata, _bump = Pubkey.find_program_address(seeds, ASSOCIATED_TOKEN_PROGRAM_ID)
    return str(ata)
