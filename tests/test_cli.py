"""The CLI as an operator runs it: exit codes and messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from escrowd.models.db import make_engine

ESCROWD = [sys.executable, "-c", "from escrowd.daemon.cli import main; main()"]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ESCROWD, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESCROWD_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    env.pop("STATE_DIRECTORY", None)
    return env


def test_version(cli_env: dict[str, str]) -> None:
    result = run(["--version"], cli_env)
    assert result.returncode == 0
    assert result.stdout.startswith("escrowd ")


# What makes a command slow to start (bench/cli_startup.py times it): none of these may be
# imported for --version or --help, only by the subcommand that needs it.
HEAVY_MODULES = ("web3", "solana", "solders", "fastapi", "sqlalchemy", "eth_tester", "pydantic")
LIST_MODULES = f"""
import sys
from escrowd.daemon.cli import main
try:
    main()
except SystemExit:
    pass
print("MODULES", *sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY_MODULES!r})))
"""


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["payouts", "--help"]])
def test_version_and_help_import_no_heavy_module(cli_env: dict[str, str], args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LIST_MODULES, *args],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("MODULES")]
    imported = line.split()[1:]
    if args[0] == "payouts":
        # The subcommand itself may load what it needs; the check is that the root does not.
        assert "sqlalchemy" in imported
    else:
        assert imported == []
    assert "Usage:" in result.stdout or result.stdout.startswith("escrowd ")


def test_init_then_checks_pass(cli_env: dict[str, str], tmp_path: Path) -> None:
    result = run(["init"], cli_env)
    assert result.returncode == 0, result.stderr
    data_dir = tmp_path / "xdg" / "escrowd"
    assert (data_dir / "escrowd.toml").exists()
    assert (data_dir / "escrowd.db").exists()
    assert "migrated empty -> " in result.stdout
    again = run(["init"], cli_env)
    assert again.returncode == 0 and "already at" in again.stdout
    for args in (["ledger", "check"], ["audit", "verify"], ["migrate"]):
        ok = run(args, cli_env)
        assert ok.returncode == 0, (args, ok.stderr)


def test_checks_exit_1_naming_problems(cli_env: dict[str, str], tmp_path: Path) -> None:
    assert run(["init"], cli_env).returncode == 0
    db = tmp_path / "xdg" / "escrowd" / "escrowd.db"
    engine = make_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO ledger_accounts (kind, owner, asset, no_overdraft, debits_posted,"
                " credits_posted, created_at) VALUES ('agent_available', 'a', 'USDC', 1, 0, 7,"
                " '2026-01-01 00:00:00')"
            )
        )
        conn.execute(
            text("INSERT INTO audit_heads (stream, seq, row_hash) VALUES ('escrow:x', 2, 'ab')")
        )
    engine.dispose()
    ledger_result = run(["ledger", "check"], cli_env)
    assert ledger_result.returncode == 1
    assert "posted_totals" in ledger_result.stdout
    audit_result = run(["audit", "verify"], cli_env)
    assert audit_result.returncode == 1
    assert "escrow:x" in audit_result.stderr


def test_bad_usage_and_bad_config_exit_2(cli_env: dict[str, str], tmp_path: Path) -> None:
    assert run(["no-such-command"], cli_env).returncode == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[escrow]\ndefault_fee_bps = 20000\n")
    result = run(["--config", str(bad), "ledger", "check"], cli_env)
    assert result.returncode == 2
    assert "escrow.default_fee_bps" in result.stderr


def test_unmigrated_database_is_reported(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(cli_env, ESCROWD_DATABASE_URL=f"sqlite:///{tmp_path / 'empty.db'}")
    result = run(["ledger", "check"], env)
    assert result.returncode == 1
    assert "escrowd migrate" in result.stderr
