"""Hierarchical deterministic keys.

- BIP-32 secp256k1 (EVM, path m/44'/60'/0'/0/i), with a watch-only fast path that derives
  deposit addresses from the account-level xpub alone.
- SLIP-0010 ed25519 (Solana, path m/44'/501'/i'/0'), hardened-only, so it needs the seed.

Elliptic-curve arithmetic is libsecp256k1 (coincurve) and ed25519 (solders); this module
only does the BIP-32 / SLIP-0010 bookkeeping around them.
"""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Final

import base58
from coincurve import PrivateKey, PublicKey
from coincurve._libsecp256k1 import ffi as _ffi
from coincurve._libsecp256k1 import lib as _lib
from coincurve.context import GLOBAL_CONTEXT
from solders.keypair import Keypair

from escrowd.wallets.addresses import (
    CHECKSUM_TABLE,
    associated_token_address,
    evm_address_from_public_key,
    keccak256,
)
from escrowd.wallets.errors import InvalidDerivation
from escrowd.wallets.secrets import Secret

HARDENED: Final = 0x80000000
MAX_INDEX: Final = HARDENED - 1
_XPRV_VERSION: Final = bytes.fromhex("0488ade4")
_XPUB_VERSION: Final = bytes.fromhex("0488b21e")
_SECP256K1_ORDER: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

# Paths. Deposit addresses: EVM m/44'/60'/0'/0/i, Solana m/44'/501'/i'/0' (the layout
# Phantom and Solflare use). Platform hot wallets live on accounts no deposit uses: EVM
# accounts 1' (payouts) and 2' (gas), Solana account 2147483647' (the largest hardened
# index; deposit indexes stop below it, see MAX_SOLANA_DEPOSIT_INDEX).
EVM_ACCOUNT_PATH: Final = "m/44'/60'/0'"
EVM_HOT_WALLET_PATH: Final = "m/44'/60'/1'/0/0"
EVM_GAS_WALLET_PATH: Final = "m/44'/60'/2'/0/0"
SOLANA_HOT_WALLET_INDEX: Final = MAX_INDEX
MAX_SOLANA_DEPOSIT_INDEX: Final = MAX_INDEX - 1
# Below this a process pool costs more to start than it saves.
_MIN_PARALLEL_COUNT: Final = 20_000


def parse_path(path: str) -> list[int]:
    """ "m/44'/60'/0'/0/5" -> child numbers; ' or h marks a hardened step."""
    parts = path.strip().split("/")
    if not parts or parts[0] != "m":
        raise InvalidDerivation(f"derivation path must start with 'm/': {path!r}")
    out = []
    for part in parts[1:]:
        hardened = part.endswith(("'", "h", "H"))
        digits = part[:-1] if hardened else part
        if not digits.isdigit() or int(digits) > MAX_INDEX:
            raise InvalidDerivation(f"bad derivation path step {part!r} in {path!r}")
        out.append(int(digits) + (HARDENED if hardened else 0))
    return out


def _hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


def _check_index(index: int, *, limit: int = MAX_INDEX) -> None:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= limit:
        raise InvalidDerivation(f"derivation index must be an integer in 0..{limit}, got {index!r}")


@dataclass(frozen=True, slots=True)
class ExtendedPublicKey:
    """A BIP-32 extended public key (public data: safe to log and to store)."""

    depth: int
    parent_fingerprint: bytes
    child_number: int
    chain_code: bytes
    public_key: bytes  # 33-byte compressed point

    @classmethod
    def parse(cls, xpub: str) -> ExtendedPublicKey:
        try:
            raw = base58.b58decode_check(xpub.strip())
        except ValueError:
            raise InvalidDerivation(
                "xpub is not valid base58check: check that it was copied completely"
            ) from None
        if len(raw) != 78 or raw[:4] != _XPUB_VERSION:
            raise InvalidDerivation("not a mainnet BIP-32 xpub (expected 78 bytes, 'xpub' prefix)")
        key = raw[45:78]
        try:
            PublicKey(key)
        except ValueError:
            raise InvalidDerivation("xpub holds a public key that is not on secp256k1") from None
        return cls(raw[4], raw[5:9], int.from_bytes(raw[9:13], "big"), raw[13:45], key)

    def serialize(self) -> str:
        return base58.b58encode_check(
            _XPUB_VERSION
            + bytes([self.depth])
            + self.parent_fingerprint
            + self.child_number.to_bytes(4, "big")
            + self.chain_code
            + self.public_key
        ).decode()

    @property
    def fingerprint(self) -> bytes:
        return _hash160(self.public_key)[:4]

    def child(self, index: int) -> ExtendedPublicKey:
        """CKDpub: non-hardened children only (hardened ones need the private key)."""
        _check_index(index)
        digest = hmac.digest(self.chain_code, self.public_key + index.to_bytes(4, "big"), "sha512")
        try:
            key = PublicKey(self.public_key).add(digest[:32])
        except ValueError:
            raise InvalidDerivation(f"index {index} gives an invalid key; skip it") from None
        return ExtendedPublicKey(
            self.depth + 1, self.fingerprint, index, digest[32:], key.format(compressed=True)
        )


class ExtendedPrivateKey:
    """A BIP-32 extended private key. Its repr shows only public metadata."""

    __slots__ = ("_chain_code", "_key", "child_number", "depth", "parent_fingerprint")

    def __init__(
        self,
        depth: int,
        parent_fingerprint: bytes,
        child_number: int,
        chain_code: Secret[bytes],
        key: Secret[bytes],
    ) -> None:
        self.depth = depth
        self.parent_fingerprint = parent_fingerprint
        self.child_number = child_number
        self._chain_code = chain_code
        self._key = key

    @classmethod
    def from_seed(cls, seed: Secret[bytes]) -> ExtendedPrivateKey:
        digest = hmac.digest(b"Bitcoin seed", seed.reveal(), "sha512")
        if not 0 < int.from_bytes(digest[:32], "big") < _SECP256K1_ORDER:
            raise InvalidDerivation("seed gives an invalid master key; generate another mnemonic")
        return cls(0, bytes(4), 0, Secret(digest[32:]), Secret(digest[:32]))

    def __repr__(self) -> str:
        return (
            f"ExtendedPrivateKey(depth={self.depth}, child_number={self.child_number}, <redacted>)"
        )

    @property
    def private_key(self) -> Secret[bytes]:
        return self._key

    def _public_key(self) -> bytes:
        return PrivateKey(self._key.reveal()).public_key.format(compressed=True)

    def public(self) -> ExtendedPublicKey:
        return ExtendedPublicKey(
            self.depth,
            self.parent_fingerprint,
            self.child_number,
            self._chain_code.reveal(),
            self._public_key(),
        )

    def serialize(self) -> Secret[str]:
        """The xprv string (secret)."""
        return Secret(
            base58.b58encode_check(
                _XPRV_VERSION
                + bytes([self.depth])
                + self.parent_fingerprint
                + self.child_number.to_bytes(4, "big")
                + self._chain_code.reveal()
                + b"\x00"
                + self._key.reveal()
            ).decode()
        )

    def child(self, number: int) -> ExtendedPrivateKey:
        """CKDpriv; `number` >= 2**31 is a hardened child."""
        if not 0 <= number <= 0xFFFFFFFF:
            raise InvalidDerivation(f"child number out of range: {number}")
        key = self._key.reveal()
        parent_public = self._public_key()
        data = (b"\x00" + key) if number >= HARDENED else parent_public
        digest = hmac.digest(self._chain_code.reveal(), data + number.to_bytes(4, "big"), "sha512")
        try:
            child_key = PrivateKey(key).add(digest[:32]).secret
        except ValueError:
            raise InvalidDerivation(f"child {number} gives an invalid key; skip it") from None
        return ExtendedPrivateKey(
            self.depth + 1,
            _hash160(parent_public)[:4],
            number,
            Secret(digest[32:]),
            Secret(child_key),
        )

    def derive(self, path: str) -> ExtendedPrivateKey:
        if self.depth != 0:
            raise InvalidDerivation("absolute paths derive from the master key only")
        node = self
        for number in parse_path(path):
            node = node.child(number)
        return node


class EvmXpubDeriver:
    """Watch-only EVM deposit addresses m/44'/60'/0'/0/i from the account xpub.

    The external-chain key m/44'/60'/0'/0 is derived once and cached, so each address
    costs one CKDpub (one HMAC-SHA512 and one libsecp256k1 tweak-add) and two Keccaks.
    """

    chain = "evm"

    def __init__(self, account_xpub: str) -> None:
        account = ExtendedPublicKey.parse(account_xpub)
        if account.depth != 3:
            raise InvalidDerivation(
                "expected the account-level xpub (m/44'/60'/0', depth 3), "
                f"got depth {account.depth}"
            )
        self.account_xpub = account.serialize()
        external = account.child(0)
        self._chain_code = external.chain_code
        self._public_key_bytes = external.public_key
        self._public_key = PublicKey(external.public_key)

    def __repr__(self) -> str:
        return f"EvmXpubDeriver({self.account_xpub[:16]}...)"

    def address(self, index: int) -> str:
        _check_index(index)
        return self._derive_range(index, 1)[0]

    def addresses(self, start: int, count: int, *, workers: int = 1) -> list[str]:
        """Addresses for indexes start .. start+count-1, in order.

        One core does roughly 15-20k addresses/s (libsecp256k1's tweak-add is most of
        it); `workers` > 1 spreads a large range over that many processes. Workers get
        only the xpub, which is public.
        """
        if count <= 0:
            return []
        _check_index(start)
        _check_index(start + count - 1)
        if workers <= 1 or count < _MIN_PARALLEL_COUNT:
            return self._derive_range(start, count)
        chunk = -(-count // workers)
        starts = list(range(start, start + count, chunk))
        counts = [min(chunk, start + count - s) for s in starts]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            parts = pool.map(_derive_evm_range, [self.account_xpub] * len(starts), starts, counts)
            return [address for part in parts for address in part]

    def _derive_range(self, start: int, count: int) -> list[str]:
        # The hot loop calls libsecp256k1 through coincurve's own cffi binding and reuses
        # one output buffer: PublicKey.add() allocates and wraps a new object per call,
        # about 15% of the per-address time. Python-level calls are inlined for the same
        # reason. Equality with the public-API path is tested for 1,000 indexes.
        chain_code, parent = self._chain_code, self._public_key_bytes
        ctx = GLOBAL_CONTEXT.ctx
        parent_struct = self._public_key.public_key
        child = _ffi.new("secp256k1_pubkey *")
        serialized = _ffi.new("unsigned char[65]")
        serialized_len = _ffi.new("size_t *")
        tweak_add, serialize = (
            _lib.secp256k1_ec_pubkey_tweak_add,
            _lib.secp256k1_ec_pubkey_serialize,
        )
        uncompressed, memmove, buffer = _lib.SECP256K1_EC_UNCOMPRESSED, _ffi.memmove, _ffi.buffer
        table, hmac_digest = CHECKSUM_TABLE, hmac.digest
        out = []
        for index in range(start, start + count):
            tweak = hmac_digest(chain_code, parent + index.to_bytes(4, "big"), "sha512")[:32]
            memmove(child, parent_struct, 64)
            if not tweak_add(ctx, child, tweak):
                raise InvalidDerivation(f"index {index} gives an invalid key; skip it")
            serialized_len[0] = 65
            serialize(ctx, serialized, serialized_len, child, uncompressed)
            raw = keccak256(buffer(serialized, 65)[1:])[-20:]
            digest = keccak256(raw.hex().encode())
            out.append(
                "0x" + "".join([table[(a << 8) | h] for a, h in zip(raw, digest, strict=False)])
            )
        return out

    def derive_address(self, index: int) -> DerivedAddress:
        return DerivedAddress(address=self.address(index), token_account=None)


def _derive_evm_range(account_xpub: str, start: int, count: int) -> list[str]:
    return EvmXpubDeriver(account_xpub).addresses(start, count)


def evm_address_of_private_key(private_key: Secret[bytes]) -> str:
    public = PrivateKey(private_key.reveal()).public_key.format(compressed=False)
    return evm_address_from_public_key(public[1:])


# SLIP-0010 ed25519


class Slip10Node:
    """A SLIP-0010 ed25519 node (private key + chain code). Repr is redacted."""

    __slots__ = ("_chain_code", "_key")

    def __init__(self, key: Secret[bytes], chain_code: Secret[bytes]) -> None:
        self._key = key
        self._chain_code = chain_code

    @classmethod
    def from_seed(cls, seed: Secret[bytes]) -> Slip10Node:
        digest = hmac.digest(b"ed25519 seed", seed.reveal(), "sha512")
        return cls(Secret(digest[:32]), Secret(digest[32:]))

    def __repr__(self) -> str:
        return "Slip10Node(<redacted>)"

    @property
    def private_key(self) -> Secret[bytes]:
        return self._key

    @property
    def chain_code(self) -> Secret[bytes]:
        return self._chain_code

    def public_key(self) -> bytes:
        """The 32-byte ed25519 public key."""
        return bytes(Keypair.from_seed(self._key.reveal()).pubkey())

    def child(self, number: int) -> Slip10Node:
        """Hardened child; ed25519 has no non-hardened derivation in SLIP-0010."""
        if not HARDENED <= number <= 0xFFFFFFFF:
            raise InvalidDerivation("ed25519 (SLIP-0010) supports hardened derivation only")
        digest = hmac.digest(
            self._chain_code.reveal(),
            b"\x00" + self._key.reveal() + number.to_bytes(4, "big"),
            "sha512",
        )
        return Slip10Node(Secret(digest[:32]), Secret(digest[32:]))

    def derive(self, path: str) -> Slip10Node:
        node = self
        for number in parse_path(path):
            node = node.child(number)
        return node


class SolanaSeedDeriver:
    """Solana deposit keys m/44'/501'/i'/0' from the seed, caching the m/44'/501' node."""

    chain = "solana"

    def __init__(self, seed: Secret[bytes], usdc_mint: str | None = None) -> None:
        coin = Slip10Node.from_seed(seed).derive("m/44'/501'")
        self._coin_key = coin.private_key.reveal()
        self._coin_chain_code = coin.chain_code.reveal()
        self.usdc_mint = usdc_mint

    def __repr__(self) -> str:
        return "SolanaSeedDeriver(<redacted>)"

    def _seed32(self, index: int) -> bytes:
        account = hmac.digest(
            self._coin_chain_code,
            b"\x00" + self._coin_key + (index | HARDENED).to_bytes(4, "big"),
            "sha512",
        )
        leaf = hmac.digest(
            account[32:], b"\x00" + account[:32] + HARDENED.to_bytes(4, "big"), "sha512"
        )
        return leaf[:32]

    def keypair(self, index: int) -> Keypair:
        """The signing keypair for index i (secret: never log it)."""
        _check_index(index)
        return Keypair.from_seed(self._seed32(index))

    def address(self, index: int) -> str:
        _check_index(index, limit=MAX_SOLANA_DEPOSIT_INDEX)
        return str(Keypair.from_seed(self._seed32(index)).pubkey())

    def addresses(self, start: int, count: int) -> list[str]:
        _check_index(start, limit=MAX_SOLANA_DEPOSIT_INDEX)
        _check_index(start + max(count - 1, 0), limit=MAX_SOLANA_DEPOSIT_INDEX)
        return [
            str(Keypair.from_seed(self._seed32(i)).pubkey()) for i in range(start, start + count)
        ]

    def derive_address(self, index: int) -> DerivedAddress:
        address = self.address(index)
        token_account = (
            associated_token_address(address, self.usdc_mint) if self.usdc_mint else None
        )
        return DerivedAddress(address=address, token_account=token_account)


@dataclass(frozen=True, slots=True)
class DerivedAddress:
    """A deposit address and, on Solana, its USDC associated token account."""

    address: str
    token_account: str | None
