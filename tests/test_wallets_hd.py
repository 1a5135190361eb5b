"""Mnemonic handling, watch-only EVM derivation and Solana derivation against bip-utils."""

from __future__ import annotations

import pickle

import pytest
from bip_utils import (
    Bip32Slip10Ed25519,
    Bip39SeedGenerator,
    Bip44,
    Bip44Changes,
    Bip44Coins,
    SolAddrEncoder,
)

from escrowd.wallets.errors import InvalidDerivation, InvalidMnemonic
from escrowd.wallets.hd import (
    EVM_ACCOUNT_PATH,
    EvmXpubDeriver,
    ExtendedPrivateKey,
    ExtendedPublicKey,
    SolanaSeedDeriver,
)
from escrowd.wallets.mnemonic import generate_mnemonic, mnemonic_to_seed, validate_mnemonic
from escrowd.wallets.secrets import Secret

ABANDON_ABOUT = "abandon " * 11 + "about"


def test_generated_mnemonic_has_24_valid_words_and_differs_each_time() -> None:
    first, second = generate_mnemonic(), generate_mnemonic()
    assert len(first.reveal().split()) == 24
    validate_mnemonic(first)
    assert first != second


def test_unknown_word_error_names_the_word_and_its_position() -> None:
    words = ABANDON_ABOUT.split()
    words[6] = "abandn"
    with pytest.raises(InvalidMnemonic) as info:
        validate_mnemonic(Secret(" ".join(words)))
    assert info.value.word == "abandn"
    assert info.value.position == 7
    assert "word 7" in str(info.value) and "'abandn'" in str(info.value)


def test_bad_checksum_and_wrong_length_are_rejected() -> None:
    with pytest.raises(InvalidMnemonic, match="checksum"):
        validate_mnemonic(Secret("abandon " * 12))
    with pytest.raises(InvalidMnemonic, match="11 words"):
        validate_mnemonic(Secret("abandon " * 11))


def test_passphrase_changes_the_seed_and_matches_bip_utils() -> None:
    plain = mnemonic_to_seed(Secret(ABANDON_ABOUT))
    salted = mnemonic_to_seed(Secret(ABANDON_ABOUT), Secret("correct horse"))
    assert plain != salted
    assert salted.reveal() == Bip39SeedGenerator(ABANDON_ABOUT).Generate("correct horse")
    assert len(salted.reveal()) == 64


def test_secret_is_redacted_and_cannot_be_pickled() -> None:
    secret = Secret(ABANDON_ABOUT)
    for text in (repr(secret), str(secret), f"{secret}", repr([secret])):
        assert "abandon" not in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    node = ExtendedPrivateKey.from_seed(mnemonic_to_seed(secret))
    assert node.private_key.reveal().hex() not in repr(node)


@pytest.fixture(scope="module")
def seed() -> Secret[bytes]:
    return mnemonic_to_seed(generate_mnemonic())


def test_watch_only_xpub_addresses_equal_bip_utils_seed_derivation_for_1000_indexes(
    seed: Secret[bytes],
) -> None:
    account_xpub = ExtendedPrivateKey.from_seed(seed).derive(EVM_ACCOUNT_PATH).public().serialize()
    reference = (
        Bip44.FromSeed(seed.reveal(), Bip44Coins.ETHEREUM)
        .Purpose()
        .Coin()
        .Account(0)
        .Change(Bip44Changes.CHAIN_EXT)
    )
    watch_only = EvmXpubDeriver(account_xpub)
    bulk = watch_only.addresses(0, 1000)
    expected = [reference.AddressIndex(i).PublicKey().ToAddress() for i in range(1000)]
    assert bulk == expected
    assert [watch_only.address(i) for i in (0, 1, 499, 999)] == [
        expected[0],
        expected[1],
        expected[499],
        expected[999],
    ]
    assert len(set(bulk)) == 1000


def test_parallel_bulk_derivation_equals_single_process(seed: Secret[bytes]) -> None:
    xpub = ExtendedPrivateKey.from_seed(seed).derive(EVM_ACCOUNT_PATH).public().serialize()
    deriver = EvmXpubDeriver(xpub)
    start = 1_000_000
    parallel = deriver.addresses(start, 20_000, workers=2)
    assert len(parallel) == 20_000
    assert parallel[::997] == [deriver.address(start + i) for i in range(0, 20_000, 997)]
    assert parallel[-1] == deriver.address(start + 19_999)


def test_xpub_round_trips_and_bad_xpubs_are_refused(seed: Secret[bytes]) -> None:
    account = ExtendedPrivateKey.from_seed(seed).derive(EVM_ACCOUNT_PATH).public()
    text = account.serialize()
    assert ExtendedPublicKey.parse(text) == account
    with pytest.raises(InvalidDerivation, match="base58check"):
        ExtendedPublicKey.parse(text[:-1] + ("1" if text[-1] != "1" else "2"))
    master_xpub = ExtendedPrivateKey.from_seed(seed).public().serialize()
    with pytest.raises(InvalidDerivation, match="depth 0"):
        EvmXpubDeriver(master_xpub)
    with pytest.raises(InvalidDerivation):
        EvmXpubDeriver(text).address(2**31)


def test_solana_addresses_match_bip_utils_slip10(seed: Secret[bytes]) -> None:
    deriver = SolanaSeedDeriver(seed)
    coin = Bip32Slip10Ed25519.FromSeed(seed.reveal()).DerivePath("m/44'/501'")
    for index in (0, 1, 2, 77, 12345):
        leaf = coin.ChildKey(index | 0x80000000).ChildKey(0x80000000)
        expected = SolAddrEncoder.EncodeKey(leaf.PublicKey().RawCompressed().ToBytes()[1:])
        assert deriver.address(index) == expected
        assert str(deriver.keypair(index).pubkey()) == expected
    assert deriver.addresses(5, 3) == [deriver.address(i) for i in (5, 6, 7)]


def test_solana_deposit_index_cannot_reach_the_hot_wallet_account(seed: Secret[bytes]) -> None:
    with pytest.raises(InvalidDerivation):
        SolanaSeedDeriver(seed).address(2**31 - 1)
