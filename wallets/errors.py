"""Typed wallet errors. Messages say what is wrong and what to do; they never carry secrets."""

from __future__ import annotations

from escrowd.config.errors import Conflict, EscrowdError, Unavailable, ValidationFailed


class WalletError(EscrowdError):
    """Base class for every error raised by the wallets package."""


class InvalidMnemonic(WalletError, ValidationFailed):
    """The mnemonic is not a valid BIP-39 English phrase.

    `word` and `position` (1-based) name the offending word when there is one. The word
    itself is not secret on its own: it is not in the word list, so it is not part of a
    valid phrase.
    """

    type = "invalid_mnemonic"

    def __init__(self, message: str, *, word: str | None = None, position: int | None = None):
        super().__init__(message)
        self.word = word
        self.position = position


class InvalidAddress(WalletError, ValidationFailed):
    """An address given to us is malformed: wrong length, characters or checksum."""

    type = "invalid_address"

    def __init__(self, message: str, *, chain: str, address: str):
        super().__init__(message)
        self.chain = chain
        self.address = address


class InvalidDerivation(WalletError, ValidationFailed):
    """A derivation request that cannot be served (bad index, bad xpub, wrong depth)."""

    type = "invalid_derivation"


class KeystoreError(WalletError):
    """Base class for keystore problems; nothing has been derived when one is raised."""

    type = "keystore_error"


class KeystoreNotFound(KeystoreError):
    """The keystore file does not exist."""


class KeystoreExists(KeystoreError, Conflict):
    """Refusing to overwrite an existing keystore."""


class KeystorePermissions(KeystoreError):
    """The keystore file is readable or writable by users other than its owner."""


class KeystoreCorrupt(KeystoreError):
    """The keystore file is truncated, not valid JSON, or has a malformed envelope."""


class WrongPassphrase(KeystoreError):
    """Decryption failed: wrong passphrase, or the file was tampered with."""


class PassphraseUnavailable(KeystoreError):
    """No keystore passphrase could be found in any configured source."""


class AllocationError(WalletError):
    """A deposit address could not be allocated."""


class AllocationContention(AllocationError, Unavailable):
    """Gave up allocating after too many concurrent conflicts; the caller may retry."""

    type = "allocation_contention"
