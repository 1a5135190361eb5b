"""BIP-39 mnemonics (English word list): generate, validate, and stretch to a seed."""

from __future__ import annotations

import hashlib
import secrets
import unicodedata
from functools import cache

from escrowd.wallets.errors import InvalidMnemonic
from escrowd.wallets.secrets import Secret

WORD_COUNTS = (12, 15, 18, 21, 24)
DEFAULT_WORD_COUNT = 24
_PBKDF2_ROUNDS = 2048


@cache
def _wordlist() -> tuple[tuple[str, ...], dict[str, int]]:
    # Imported on first use: bip_utils takes seconds to import, and most commands
    # (and every process that only watches addresses) never need the word list.
    from bip_utils import Bip39Languages
    from bip_utils.bip.bip39.bip39_mnemonic_utils import Bip39WordsListGetter

    words_list = Bip39WordsListGetter().GetByLanguage(Bip39Languages.ENGLISH)
    words = tuple(words_list.GetWordAtIdx(i) for i in range(words_list.Length()))
    assert len(words) == 2048
    return words, {w: i for i, w in enumerate(words)}


def _normalize(text: str) -> str:
    return unicodedata.normalize("NFKD", text)


def entropy_to_mnemonic(entropy: bytes) -> Secret[str]:
    """Encode 16..32 bytes of entropy as a BIP-39 phrase (11 bits a word, checksum last)."""
    if len(entropy) not in (16, 20, 24, 28, 32):
        raise ValueError("entropy must be 16, 20, 24, 28 or 32 bytes")
    words, _ = _wordlist()
    checksum_bits = len(entropy) * 8 // 32
    checksum = hashlib.sha256(entropy).digest()[0] >> (8 - checksum_bits)
    value = (int.from_bytes(entropy, "big") << checksum_bits) | checksum
    count = (len(entropy) * 8 + checksum_bits) // 11
    indexes = [(value >> (11 * (count - 1 - i))) & 0x7FF for i in range(count)]
    return Secret(" ".join(words[i] for i in indexes))


def generate_mnemonic(word_count: int = DEFAULT_WORD_COUNT) -> Secret[str]:
    """A fresh phrase from the OS random source (24 words = 256 bits by default)."""
    if word_count not in WORD_COUNTS:
        raise ValueError(f"word_count must be one of {WORD_COUNTS}")
    return entropy_to_mnemonic(secrets.token_bytes(word_count * 11 * 32 // 33 // 8))


def mnemonic_to_entropy(mnemonic: Secret[str]) -> Secret[bytes]:
    """Validate a phrase and return its entropy.

    Raises InvalidMnemonic naming the first unknown word and its 1-based position, or
    saying the word count or checksum is wrong. Known words are never echoed: a valid
    word is part of the secret.
    """
    _, index_of = _wordlist()
    given = _normalize(mnemonic.reveal()).lower().split()
    if len(given) not in WORD_COUNTS:
        raise InvalidMnemonic(
            f"mnemonic has {len(given)} words; expected one of {', '.join(map(str, WORD_COUNTS))}"
        )
    value = 0
    for position, word in enumerate(given, start=1):
        idx = index_of.get(word)
        if idx is None:
            raise InvalidMnemonic(
                f"word {position} ({word!r}) is not in the BIP-39 English word list; "
                "check the spelling of that word",
                word=word,
                position=position,
            )
        value = (value << 11) | idx
    checksum_bits = len(given) * 11 // 33
    entropy_bits = len(given) * 11 - checksum_bits
    entropy = (value >> checksum_bits).to_bytes(entropy_bits // 8, "big")
    expected = hashlib.sha256(entropy).digest()[0] >> (8 - checksum_bits)
    if expected != value & ((1 << checksum_bits) - 1):
        raise InvalidMnemonic(
            "mnemonic checksum does not match: a word is wrong or the words are out of order"
        )
    return Secret(entropy)


def validate_mnemonic(mnemonic: Secret[str]) -> None:
    """Raise InvalidMnemonic if the phrase is not valid; return None otherwise."""
    mnemonic_to_entropy(mnemonic)


def mnemonic_to_seed(mnemonic: Secret[str], passphrase: Secret[str] | None = None) -> Secret[bytes]:
    """The 64-byte BIP-39 seed: PBKDF2-HMAC-SHA512(phrase, "mnemonic" + passphrase, 2048)."""
    validate_mnemonic(mnemonic)
    phrase = " ".join(_normalize(mnemonic.reveal()).lower().split())
    salt = "mnemonic" + _normalize(passphrase.reveal() if passphrase is not None else "")
    return Secret(hashlib.pbkdf2_hmac("sha512", phrase.encode(), salt.encode(), _PBKDF2_ROUNDS))
