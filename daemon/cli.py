"""The `escrowd` command line.

Exit codes: 0 success, 1 a check found problems (or an operation failed), 2 bad usage or
configuration.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, NoReturn

import tomli_w
import typer
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from config.errors import EscrowdError
from config.settings import Settings, SettingsError, default_data_dir, load_settings
from daemon.cli_api import apikey_app
from daemon.cli_backfill import backfill_app
from daemon.cli_devnet import devnet_app
from daemon.cli_keys import address_app, keys_app
from daemon.cli_payouts import payouts_app, reconcile
from daemon.cli_run import register as register_run
from daemon.logs import configure_logging
from escrow import audit, ledger
from migrations.runner import current_revision, head_revision, upgrade_to_head
from models.db import make_engine, make_session_factory

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
CONFIG_FILE_NAME = "escrowd.toml"

app = typer.Typer(
    name="escrowd",
    help="escrowd: deposits, double-entry ledger, escrow and payouts for an agent marketplace.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ledger_app = typer.Typer(help="Ledger invariants.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
app.add_typer(audit_app, name="audit")
app.add_typer(devnet_app, name="devnet")
app.add_typer(keys_app, name="keys")
app.add_typer(address_app, name="address")
app.add_typer(backfill_app, name="backfill")
app.add_typer(apikey_app, name="apikey")
app.add_typer(payouts_app, name="payouts")
app.command(name="reconcile")(reconcile)
register_run(app)


def package_version() -> str:
    try:
        return version("escrowd")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class CliState:
    config_path: Path | None = None
    _settings: Settings | None = field(default=None, repr=False)
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.settings.resolved_database_url)
        return self._engine


def fail(message: str, code: int = EXIT_PROBLEMS) -> NoReturn:
    typer.echo(f"escrowd: {message}", err=True)
    raise typer.Exit(code)


def state_of(ctx: typer.Context) -> CliState:
    state = ctx.find_root().obj
    assert isinstance(state, CliState)
    return state


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"escrowd {package_version()}")
        raise typer.Exit(0)


def _default_config_path() -> Path | None:
    candidate = default_data_dir() / CONFIG_FILE_NAME
    return candidate if candidate.exists() else None


@app.callback()
def main_callback(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="ESCROWD_CONFIG",
            help="TOML config file (default: <data dir>/escrowd.toml when it exists).",
        ),
    ] = None,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    ctx.obj = CliState(config_path=config or _default_config_path())


@app.command()
def init(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the database, keystore and config live.")
    ] = None,
) -> None:
    """Create the data directory and a config file, then migrate the database."""
    state = state_of(ctx)
    base = state.settings
    target_dir = (data_dir or base.data_dir).expanduser().resolve()
    target_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_path = state.config_path or target_dir / CONFIG_FILE_NAME
    if config_path.exists():
        typer.echo(f"config: {config_path} (exists, left as is)")
    else:
        document = {"data_dir": str(target_dir)}
        if base.database_url:
            document["database_url"] = base.database_url
        config_path.write_text(
            "# escrowd configuration; every key is documented in escrowd.example.toml\n"
            + tomli_w.dumps(document),
            encoding="utf-8",
        )
        typer.echo(f"config: {config_path} (created)")
    state.config_path = config_path
    state._settings = load_settings(config_path)
    _migrate(state)
    typer.echo(f"data dir: {target_dir}")


def _migrate(state: CliState) -> None:
    before = current_revision(state.engine)
    upgrade_to_head(state.engine)
    after = current_revision(state.engine)
    url = state.engine.url.render_as_string(hide_password=True)
    if before == after:
        typer.echo(f"database: {url} already at {after}")
    else:
        typer.echo(f"database: {url} migrated {before or 'empty'} -> {after}")


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Upgrade the database schema to the newest revision."""
    _migrate(state_of(ctx))


def require_schema(state: CliState) -> None:
    current = current_revision(state.engine)
    if current != head_revision():
        fail(
            f"database schema is at {current or 'nothing'}, expected {head_revision()}: "
            "run `escrowd migrate` first"
        )


@ledger_app.command("check")
def ledger_check(ctx: typer.Context) -> None:
    """Verify the ledger invariants; exit 1 listing each violation."""
    state = state_of(ctx)
    require_schema(state)
    with make_session_factory(state.engine, read_only=True)() as session:
        violations = ledger.check(session)
    if violations:
        for violation in violations:
            typer.echo(f"VIOLATION {violation.check}: {violation.message}")
        fail(f"ledger check found {len(violations)} violation(s)")
    typer.echo("ledger check: ok (all invariants hold)")


@audit_app.command("verify")
def audit_verify(ctx: typer.Context) -> None:
    """Verify the audit trail's hash chains; exit 1 naming the first bad row."""
    state = state_of(ctx)
    require_schema(state)
    with make_session_factory(state.engine, read_only=True)() as session:
        report = audit.verify(session)
    if not report.ok:
        for _, problem in sorted(report.problems):
            typer.echo(f"BAD {problem}")
        fail(f"audit verify failed; first bad: {report.first_problem}")
    typer.echo(f"audit verify: ok ({report.rows_checked} rows in {report.streams_checked} streams)")


@audit_app.command("checkpoint")
def audit_checkpoint(ctx: typer.Context) -> None:
    """Anchor every audit stream's head in a checkpoint row."""
    state = state_of(ctx)
    require_schema(state)
    with make_session_factory(state.engine)() as session, session.begin():
        row_id = audit.write_checkpoint(session, actor="cli")
    typer.echo(f"audit checkpoint: row {row_id}")


def main() -> None:
    configure_logging(fmt="console", level="warning")
    try:
        # Without standalone mode click returns a typer.Exit's code instead of exiting.
        exit_code = app(standalone_mode=False)
    except SettingsError as exc:
        typer.echo(f"escrowd: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except EscrowdError as exc:
        typer.echo(f"escrowd: {exc.message}", err=True)
        sys.exit(EXIT_PROBLEMS)
    except OperationalError as exc:
        typer.echo(f"escrowd: database unavailable: {exc.orig}", err=True)
        sys.exit(EXIT_PROBLEMS)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("escrowd: aborted", err=True)
        sys.exit(EXIT_PROBLEMS)
    except Exception as exc:
        # Usage errors come from the click that typer bundles; they know how to show themselves.
        show, exit_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            sys.exit(exit_code)
        raise
    sys.exit(exit_code if isinstance(exit_code, int) else 0)
