"""The `escrowd` command line.

Exit codes: 0 success, 1 a check found problems (or an operation failed), 2 bad usage or
configuration.

Commands are looked up lazily: a subcommand's module (and web3, solana, FastAPI, SQLAlchemy
behind it) is imported only when that subcommand runs, so `escrowd --version` and
`escrowd --help` start in a fraction of a second. Keep this module's own imports light.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from escrowd.config.settings import Settings

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
CONFIG_FILE_NAME = "escrowd.toml"

# name -> (module, attribute, one-line help). The attribute is a Typer sub-app or a
# command function; the help is what `escrowd --help` shows without importing the module.
LAZY_COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("escrowd.daemon.cli_run", "run", "Run the daemon: pollers, payouts, webhooks, API."),
    "api": ("escrowd.daemon.cli_run", "api", "Serve only the HTTP API (run --role api)."),
    "worker": ("escrowd.daemon.cli_run", "worker", "Run only the jobs (run --role worker)."),
    "dev": ("escrowd.daemon.cli_run", "dev", "Everything on one machine: SQLite, EVM, Solana."),
    "devnet": ("escrowd.daemon.cli_devnet", "devnet_app", "Local chain simulators."),
    "keys": ("escrowd.daemon.cli_keys", "keys_app", "The encrypted keystore."),
    "address": ("escrowd.daemon.cli_keys", "address_app", "Deposit addresses of agents."),
    "backfill": ("escrowd.daemon.cli_backfill", "backfill_app", "Rescan block ranges."),
    "apikey": ("escrowd.daemon.cli_api", "apikey_app", "API keys of the HTTP API."),
    "payouts": ("escrowd.daemon.cli_payouts", "payouts_app", "Inspect on-chain payouts."),
    "reconcile": (
        "escrowd.daemon.cli_reconcile",
        "reconcile",
        "On-chain balances against the ledger's custody.",
    ),
    "tokens": (
        "escrowd.daemon.cli_tokens",
        "tokens_app",
        "Other tokens sent to deposit addresses: list, recover.",
    ),
    "wallets": (
        "escrowd.daemon.cli_wallets",
        "wallets_app",
        "Platform wallets: balances, needs, booking operator funding.",
    ),
}


def _load_command(name: str) -> Any:
    module_name, attribute, _ = LAZY_COMMANDS[name]
    target = getattr(importlib.import_module(module_name), attribute)
    # Mounted under a holder as `add_typer` would mount it, so it gets no root-only options.
    holder = typer.Typer(add_completion=False, rich_markup_mode=None)
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    else:
        holder.command(name)(target)
    holder.callback()(lambda: None)
    return typer.main.get_command(holder).commands[name]  # type: ignore[attr-defined]


class LazyGroup(TyperGroup):
    """A Typer group whose LAZY_COMMANDS are imported when invoked, not when listed.

    Contexts, formatters and commands are typed Any: their classes live in the click that
    typer vendors, which has no public import path."""

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in LAZY_COMMANDS:
            return _load_command(cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS:
                rows.append((name, LAZY_COMMANDS[name][2]))
                continue
            command = super().get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    name="escrowd",
    help="escrowd: deposits, double-entry ledger, escrow and payouts for an agent marketplace.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    cls=LazyGroup,
)
ledger_app = typer.Typer(help="Ledger invariants.", no_args_is_help=True, rich_markup_mode=None)
audit_app = typer.Typer(
    help="The tamper-evident audit trail.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(ledger_app, name="ledger")
app.add_typer(audit_app, name="audit")


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
            from escrowd.config.settings import load_settings

            self._settings = load_settings(self.config_path)
        return self._settings

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from escrowd.models.db import make_engine

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
    from escrowd.config.settings import default_data_dir

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
    from escrowd.daemon.logs import configure_logging

    # JSON unless on a terminal: under systemd even the warnings of loading the settings
    # (before `run` configures its own logging) are JSON lines.
    configure_logging(fmt="auto", level="warning")
    ctx.obj = CliState(config_path=config or _default_config_path())


@app.command()
def init(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where the database, keystore and config live.")
    ] = None,
) -> None:
    """Create the data directory and a config file, then migrate the database."""
    import tomli_w

    from escrowd.config.settings import load_settings

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
    from escrowd.migrations.runner import current_revision, upgrade_to_head

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
    from escrowd.migrations.runner import current_revision, head_revision

    current = current_revision(state.engine)
    if current != head_revision():
        fail(
            f"database schema is at {current or 'nothing'}, expected {head_revision()}: "
            "run `escrowd migrate` first"
        )


@ledger_app.command("check")
def ledger_check(ctx: typer.Context) -> None:
    """Verify the ledger invariants; exit 1 listing each violation."""
    from escrowd.escrow import ledger
    from escrowd.models.db import make_session_factory

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
    from escrowd.escrow import audit
    from escrowd.models.db import make_session_factory

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
    from escrowd.escrow import audit
    from escrowd.models.db import make_session_factory

    state = state_of(ctx)
    require_schema(state)
    with make_session_factory(state.engine)() as session, session.begin():
        row_id = audit.write_checkpoint(session, actor="cli")
    typer.echo(f"audit checkpoint: row {row_id}")


def _is(exc: BaseException, module: str, name: str) -> bool:
    """isinstance against a class of a module only if that module was ever imported: an
    exception cannot come from a module nobody loaded, and --version must stay light."""
    loaded = sys.modules.get(module)
    cls: Any = getattr(loaded, name, None) if loaded is not None else None
    return cls is not None and isinstance(exc, cls)


def main() -> None:
    try:
        # Without standalone mode click returns a typer.Exit's code instead of exiting.
        exit_code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("escrowd: aborted", err=True)
        sys.exit(EXIT_PROBLEMS)
    except Exception as exc:
        if _is(exc, "escrowd.config.settings", "SettingsError"):
            typer.echo(f"escrowd: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        if _is(exc, "escrowd.config.errors", "EscrowdError"):
            typer.echo(f"escrowd: {getattr(exc, 'message', exc)}", err=True)
            sys.exit(EXIT_PROBLEMS)
        if _is(exc, "sqlalchemy.exc", "OperationalError"):
            typer.echo(f"escrowd: database unavailable: {getattr(exc, 'orig', exc)}", err=True)
            sys.exit(EXIT_PROBLEMS)
        # Usage errors come from click; they know how to show themselves.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise
    sys.exit(exit_code if isinstance(exit_code, int) else 0)
