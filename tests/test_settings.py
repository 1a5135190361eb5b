"""Settings: TOML file, ESCROWD_* overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from escrowd.config.settings import SettingsError, load_settings
from tests.log_capture import captured_logs

CHAIN = """
[[evm_chains]]
name = "base"
chain_id = 8453
rpc_urls = ["http://127.0.0.1:8545"]
usdc_address = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
confirmations = 12
"""


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "escrowd.toml"
    path.write_text(body, encoding="utf-8")
    return path


def test_defaults_use_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(environ={"ESCROWD_DATA_DIR": str(tmp_path)})
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'escrowd.db'}"
    assert settings.keystore_path == tmp_path / "keystore.json"


def test_file_then_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, f'data_dir = "{tmp_path}"\n[api]\nport = 9000\n' + CHAIN)
    settings = load_settings(path, environ={"ESCROWD_API__PORT": "9100"})
    assert settings.api.port == 9100
    assert settings.evm_chain("base").confirmations == 12
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    switched = load_settings(path, environ={"ESCROWD_DATABASE_URL": url})
    assert switched.resolved_database_url == url


def test_config_env_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[escrow]\ndefault_fee_bps = 100\n")
    settings = load_settings(environ={"ESCROWD_CONFIG": str(path)})
    assert settings.escrow.default_fee_bps == 100


@pytest.mark.parametrize(
    ("body", "env", "named"),
    [
        ("[api]\nprot = 1\n", {}, "api.prot: unknown key"),
        ("[escrow]\ndefault_fee_bps = 10001\n", {}, "escrow.default_fee_bps"),
        ('[api]\nport = "80"\n', {}, "api.port"),
        (CHAIN.replace("confirmations = 12", "confirmations = -1"), {}, "confirmations"),
        ("", {"ESCROWD_API__PORT": "eighty"}, "api.port"),
        ('database_url = "mysql://x"\n', {}, "database_url"),
        (CHAIN + CHAIN, {}, "repeated: base"),
    ],
)
def test_bad_values_fail_naming_the_key(
    tmp_path: Path, body: str, env: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(_write(tmp_path, body), environ=env)


def test_an_unknown_environment_variable_is_a_warning_naming_it(tmp_path: Path) -> None:
    env = {
        "ESCROWD_NOPE": "1",
        "ESCROWD_API__PROT": "1",
        "ESCROWD_LOG__LEVEL__DEEP": "x",
        "ESCROWD_API__PORT": "9100",
    }
    with captured_logs() as logs:
        settings = load_settings(_write(tmp_path, ""), environ=env)
    assert settings.api.port == 9100
    warned = [e["variable"] for e in logs if e["event"] == "unknown_environment_variable"]
    assert warned == ["ESCROWD_API__PROT", "ESCROWD_LOG__LEVEL__DEEP", "ESCROWD_NOPE"]
    assert all(e["log_level"] == "warning" for e in logs)
    # A known key with a bad value, and an unknown key in the file, stay errors.
    with captured_logs(), pytest.raises(SettingsError, match=r"api\.port"):
        load_settings(_write(tmp_path, ""), environ={**env, "ESCROWD_API__PORT": "eighty"})
    with (
        captured_logs(),
        pytest.raises(SettingsError, match=r"api\.prot: unknown key"),
    ):
        load_settings(_write(tmp_path, "[api]\nprot = 1\n"), environ=env)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "absent.toml", environ={})
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(_write(tmp_path, "[api\n"), environ={})


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "config" / "escrowd.example.toml"
    settings = load_settings(example, environ={})
    assert settings.evm_chains, "the example documents an EVM chain"
    assert settings.solana is not None
