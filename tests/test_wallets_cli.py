"""`escrowd keys` / `escrowd address`, and a full run checked for leaked secrets."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import base58
import pytest
import structlog
import typer
from typer.testing import CliRunner

from escrowd.daemon.cli_keys import address_app, keys_app
from escrowd.daemon.logs import configure_logging
from escrowd.wallets.errors import WalletError
from escrowd.wallets.keystore import unlock_keystore
from escrowd.wallets.mnemonic import mnemonic_to_entropy, mnemonic_to_seed
from escrowd.wallets.secrets import Secret

PASSPHRASE = "cli-test-passphrase-9"


class _CurrentStderr:
    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _root() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(keys_app, name="keys")
    root.add_typer(address_app, name="address")
    return root


@pytest.fixture(autouse=True)
def logs_to_stderr() -> Iterator[None]:
    # As the real CLI does (daemon.cli configures logging): logs on stderr, output on stdout.
    # The stream is looked up at each write, so logs land in whichever stderr is current:
    # CliRunner's inside a command, capsys's outside.
    configure_logging(fmt="json", level="debug")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()))
    yield
    structlog.reset_defaults()


@pytest.fixture
def cli_env(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("ESCROWD_CONFIG", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    return {
        "ESCROWD_DATA_DIR": str(tmp_path / "data"),
        "ESCROWD_DATABASE_URL": sqlite_url,
        "ESCROWD_KEYSTORE__SCRYPT_LOG2_N": "10",
        "ESCROWD_KEYSTORE_PASSPHRASE": PASSPHRASE,
    }


def _run(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(_root(), args, env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_keys_init_xpub_and_addresses(cli_env: dict[str, str], tmp_path: Path) -> None:
    code, out, err = _run(["keys", "init"], cli_env)
    assert code == 0, err
    mnemonic = out.strip().splitlines()[-1]
    assert len(mnemonic.split()) == 24
    assert "never be shown again" in err
    keystore = tmp_path / "data" / "keystore.json"
    assert keystore.stat().st_mode & 0o777 == 0o600

    code, out, err = _run(["keys", "init"], cli_env)
    assert code == 1 and "already exists" in err
    code, xpub, _ = _run(["keys", "xpub"], cli_env)
    assert code == 0 and xpub.startswith("xpub")

    code, evm_address, err = _run(["address", "new", "--agent", "a-1", "--chain", "evm"], cli_env)
    assert code == 0, err
    code, again, _ = _run(["address", "new", "--agent", "a-1", "--chain", "evm"], cli_env)
    assert again == evm_address
    code, sol_address, _ = _run(
        ["address", "new", "--agent", "a-1", "--chain-family", "solana"], cli_env
    )
    code, other, _ = _run(["address", "new", "--agent", "a-2", "--chain", "evm"], cli_env)
    assert other != evm_address
    unlocked = unlock_keystore(keystore, Secret(PASSPHRASE))
    assert evm_address.strip() == unlocked.derive_evm(0).address
    assert other.strip() == unlocked.derive_evm(1).address
    assert sol_address.strip() == unlocked.derive_solana(0).address

    code, listing, _ = _run(["address", "list"], cli_env)
    lines = listing.strip().splitlines()
    assert lines[0].startswith("chain_family\tindex\tagent")
    assert f"evm\t1\ta-2\t{other.strip()}\t-" in lines
    assert len(lines) == 4

    code, _, err = _run(["address", "new", "--agent", "a-3", "--chain", "tron"], cli_env)
    assert code == 2 and "tron" in err


def test_cli_errors_are_clear_and_change_nothing(cli_env: dict[str, str], tmp_path: Path) -> None:
    code, _, err = _run(["keys", "xpub"], cli_env)
    assert code == 1 and "escrowd keys init" in err
    _run(["keys", "init"], cli_env)
    code, _, err = _run(["keys", "xpub"], {**cli_env, "ESCROWD_KEYSTORE_PASSPHRASE": "wrong"})
    assert code == 1 and "wrong passphrase" in err
    (tmp_path / "data" / "keystore.json").chmod(0o644)
    code, _, err = _run(["address", "new", "--agent", "z", "--chain", "evm"], cli_env)
    assert code == 1 and "chmod 600" in err
    code, listing, _ = _run(["address", "list"], cli_env)
    assert listing.strip().splitlines()[1:] == []


def _secret_patterns(mnemonic: str, keystore: Path) -> list[str]:
    words = mnemonic.split()
    unlocked = unlock_keystore(keystore, Secret(PASSPHRASE))
    seed = mnemonic_to_seed(Secret(mnemonic)).reveal()
    patterns = [" ".join(words[i : i + 3]) for i in range(len(words) - 2)]
    patterns += [
        seed.hex(),
        mnemonic_to_entropy(Secret(mnemonic)).reveal().hex(),
        PASSPHRASE,
    ]
    keys = [unlocked.evm_hot_wallet, unlocked.evm_gas_wallet, unlocked.derive_evm(0)]
    patterns += [k.private_key.reveal().hex() for k in keys]
    for sol in (unlocked.solana_hot_wallet, unlocked.derive_solana(0)):
        raw = sol.keypair_bytes.reveal()
        patterns += [raw.hex(), raw[:32].hex(), base58.b58encode(raw).decode()]
    return patterns


def test_full_run_never_leaks_a_secret(
    cli_env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    try:
        transcript: list[str] = []
        code, init_out, init_err = _run(["keys", "init"], cli_env)
        assert code == 0
        mnemonic = init_out.strip().splitlines()[-1]
        # The one intended display: `keys init` stdout holds the phrase exactly once.
        assert init_out.count(mnemonic) == 1
        transcript += [init_out.replace(mnemonic, "<the one intended display>"), init_err]
        runs = [
            ["keys", "xpub"],
            ["address", "new", "--agent", "leak-1", "--chain", "evm"],
            ["address", "new", "--agent", "leak-1", "--chain", "solana"],
            ["address", "list"],
            ["keys", "init"],
        ]
        for args in runs:
            transcript += list(_run(args, cli_env)[1:])
        wrong = {**cli_env, "ESCROWD_KEYSTORE_PASSPHRASE": "wrong passphrase"}
        transcript += list(_run(["keys", "xpub"], wrong)[1:])
        keystore = tmp_path / "data" / "keystore.json"
        for bad in (Secret("nope"), Secret(mnemonic)):
            with pytest.raises(WalletError) as info:
                unlock_keystore(keystore, bad)
            transcript += [str(info.value), repr(info.value)]
        unlocked = unlock_keystore(keystore, Secret(PASSPHRASE))
        transcript += [
            repr(unlocked),
            repr(unlocked.evm_hot_wallet),
            repr(unlocked.solana_hot_wallet),
            repr(unlocked.derive_evm(4)),
            repr(unlocked.derive_solana(4)),
            repr(unlocked.mnemonic()),
            repr(unlocked.solana_deriver()),
        ]
        structlog.get_logger("leak-test").info(
            "probe", keystore=unlocked, hot=unlocked.evm_hot_wallet
        )
        captured = capsys.readouterr()
        transcript += [captured.out, captured.err, caplog.text]
        transcript += [record.getMessage() for record in caplog.records]
    finally:
        capsys.readouterr()
    text = "\n".join(transcript)
    assert "keystore_unlocked" in text and "probe" in text  # the logs were captured
    leaked = [p for p in _secret_patterns(mnemonic, keystore) if p.lower() in text.lower()]
    # Report how many, not which: the assertion message must not become the leak.
    assert not leaked, f"{len(leaked)} secret pattern(s) found in output"
    assert not re.search(r"\b[0-9a-f]{64}\b", text)
