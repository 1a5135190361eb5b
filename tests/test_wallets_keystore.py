"""Keystore: round trip, wrong passphrase, tampering, truncation, permissions, sources."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from escrowd.wallets.errors import (
    KeystoreCorrupt,
    KeystoreExists,
    KeystoreNotFound,
    KeystorePermissions,
    PassphraseUnavailable,
    WrongPassphrase,
)
from escrowd.wallets.hd import EvmXpubDeriver, SolanaSeedDeriver, evm_address_of_private_key
from escrowd.wallets.keystore import (
    create_keystore,
    load_passphrase,
    read_account_xpub,
    unlock_keystore,
)
from escrowd.wallets.mnemonic import mnemonic_to_seed
from escrowd.wallets.secrets import Secret

ABANDON_ABOUT = "abandon " * 11 + "about"
FAST_SCRYPT = 10  # tests only; production default is 2**15
PASSPHRASE = Secret("keystore-pass-123")


@pytest.fixture
def keystore_path(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "keystore.json"
    create_keystore(path, PASSPHRASE, mnemonic=Secret(ABANDON_ABOUT), scrypt_log2_n=FAST_SCRYPT)
    return path


def test_round_trip_restores_the_same_wallet(keystore_path: Path) -> None:
    assert oct(keystore_path.stat().st_mode & 0o777) == "0o600"
    unlocked = unlock_keystore(keystore_path, PASSPHRASE)
    assert unlocked.mnemonic().reveal() == ABANDON_ABOUT
    assert unlocked.derive_evm(0).address == "0x9858EfFD232B4033E47d90003D41EC34EcaEda94"
    assert unlocked.derive_solana(0).address == "HAgk14JpMQLgt6rVgv7cBQFJWFto5Dqxi472uT3DKpqk"
    assert EvmXpubDeriver(unlocked.evm_account_xpub).address(5) == unlocked.derive_evm(5).address
    # Hot wallets: dedicated paths, distinct from any deposit address, signing keys usable.
    hot, gas, sol = unlocked.evm_hot_wallet, unlocked.evm_gas_wallet, unlocked.solana_hot_wallet
    assert hot.path == "m/44'/60'/1'/0/0" and gas.path == "m/44'/60'/2'/0/0"
    assert evm_address_of_private_key(hot.private_key) == hot.address
    assert len({hot.address, gas.address, unlocked.derive_evm(0).address}) == 3
    assert sol.path == "m/44'/501'/2147483647'/0'"
    assert str(sol.keypair().pubkey()) == sol.address
    seed = mnemonic_to_seed(Secret(ABANDON_ABOUT))
    assert SolanaSeedDeriver(seed).keypair(2**31 - 1).pubkey() == sol.keypair().pubkey()
    for text in (repr(unlocked), repr(hot), repr(sol), repr(unlocked.derive_evm(3))):
        assert hot.private_key.reveal().hex() not in text
        assert "abandon" not in text


def test_bip39_passphrase_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "ks.json"
    created = create_keystore(
        path,
        PASSPHRASE,
        mnemonic=Secret(ABANDON_ABOUT),
        bip39_passphrase=Secret("extra words"),
        scrypt_log2_n=FAST_SCRYPT,
    )
    unlocked = unlock_keystore(path, PASSPHRASE)
    assert unlocked.derive_evm(0).address == created.derive_evm(0).address
    assert unlocked.derive_evm(0).address != "0x9858EfFD232B4033E47d90003D41EC34EcaEda94"


def test_watch_only_host_reads_the_xpub_without_the_passphrase(keystore_path: Path) -> None:
    xpub = read_account_xpub(keystore_path)
    assert xpub == unlock_keystore(keystore_path, PASSPHRASE).evm_account_xpub
    assert EvmXpubDeriver(xpub).address(0) == "0x9858EfFD232B4033E47d90003D41EC34EcaEda94"


def test_wrong_passphrase_is_refused(keystore_path: Path) -> None:
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        unlock_keystore(keystore_path, Secret("not it"))


def _rewrite(path: Path, envelope: dict[str, object]) -> None:
    path.write_text(json.dumps(envelope))
    path.chmod(0o600)


def test_tampered_ciphertext_is_refused(keystore_path: Path) -> None:
    envelope = json.loads(keystore_path.read_text())
    raw = bytearray(base64.b64decode(envelope["ciphertext"]))
    raw[10] ^= 0x01
    envelope["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    _rewrite(keystore_path, envelope)
    with pytest.raises(WrongPassphrase, match="modified"):
        unlock_keystore(keystore_path, PASSPHRASE)


def test_tampered_header_is_refused_because_it_is_authenticated(keystore_path: Path) -> None:
    envelope = json.loads(keystore_path.read_text())
    other = create_keystore(
        keystore_path.with_name("other.json"), PASSPHRASE, scrypt_log2_n=FAST_SCRYPT
    )
    envelope["evm_account_xpub"] = other.evm_account_xpub
    _rewrite(keystore_path, envelope)
    with pytest.raises(WrongPassphrase):
        unlock_keystore(keystore_path, PASSPHRASE)


def test_truncated_file_is_reported_as_corrupt(keystore_path: Path) -> None:
    data = keystore_path.read_bytes()
    keystore_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(KeystoreCorrupt, match="truncated"):
        unlock_keystore(keystore_path, PASSPHRASE)


def test_hostile_scrypt_parameters_are_refused_before_any_work(keystore_path: Path) -> None:
    envelope = json.loads(keystore_path.read_text())
    envelope["kdf_params"]["n"] = 2**30
    _rewrite(keystore_path, envelope)
    with pytest.raises(KeystoreCorrupt, match="scrypt n"):
        unlock_keystore(keystore_path, PASSPHRASE)


def test_mode_wider_than_0600_is_refused_with_the_chmod_to_run(keystore_path: Path) -> None:
    keystore_path.chmod(0o644)
    with pytest.raises(KeystorePermissions, match=f"chmod 600 {keystore_path}") as info:
        unlock_keystore(keystore_path, PASSPHRASE)
    assert "0644" in str(info.value)


def test_missing_file_and_overwrite_are_refused(keystore_path: Path) -> None:
    with pytest.raises(KeystoreNotFound, match="escrowd keys init"):
        unlock_keystore(keystore_path.with_name("absent.json"), PASSPHRASE)
    before = keystore_path.read_bytes()
    with pytest.raises(KeystoreExists):
        create_keystore(keystore_path, PASSPHRASE, scrypt_log2_n=FAST_SCRYPT)
    assert keystore_path.read_bytes() == before
    assert [p.name for p in keystore_path.parent.iterdir()] == ["keystore.json"]


def test_passphrase_sources_in_documented_order(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "keystore-passphrase").write_text("from-credential\n")
    secret_file = tmp_path / "pass.txt"
    secret_file.write_text("from-file\n")
    secret_file.chmod(0o600)
    env = {"CREDENTIALS_DIRECTORY": str(creds), "ESCROWD_KEYSTORE_PASSPHRASE": "from-env"}

    def found(**kwargs: object) -> str:
        return load_passphrase(**kwargs).reveal()  # type: ignore[arg-type]

    assert found(environ=env, passphrase_file=secret_file) == "from-credential"
    del env["CREDENTIALS_DIRECTORY"]
    assert found(environ=env, passphrase_file=secret_file) == "from-file"
    assert found(environ=env) == "from-env"
    assert found(environ={"MY_PASS": "custom"}, env_name="MY_PASS") == "custom"
    creds_env = {"CREDENTIALS_DIRECTORY": str(creds)}
    (creds / "ks").write_text("named\r\n")
    assert found(environ=creds_env, credential_name="ks") == "named"
    with pytest.raises(PassphraseUnavailable, match="ESCROWD_KEYSTORE_PASSPHRASE"):
        load_passphrase(environ={})
    secret_file.chmod(0o640)
    with pytest.raises(KeystorePermissions, match="chmod 600"):
        load_passphrase(environ={}, passphrase_file=secret_file)


def test_passphrase_from_env_unlocks(keystore_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCROWD_KEYSTORE_PASSPHRASE", PASSPHRASE.reveal())
    unlocked = unlock_keystore(keystore_path, load_passphrase())
    assert unlocked.derive_evm(0).address == "0x9858EfFD232B4033E47d90003D41EC34EcaEda94"


def test_default_scrypt_cost_is_2_pow_15(tmp_path: Path) -> None:
    path = tmp_path / "ks.json"
    create_keystore(path, PASSPHRASE)
    assert json.loads(path.read_text())["kdf_params"]["n"] == 2**15
    assert os.stat(path).st_mode & 0o777 == 0o600
