"""`escrowd run` and `escrowd dev`, looked up lazily by daemon/cli.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Protocol

import structlog
import typer
from sqlalchemy import Engine

from escrowd.config.settings import Settings
from escrowd.daemon.logs import configure_logging
from escrowd.daemon.runner import Daemon, DaemonParts, Role, run_daemon
from escrowd.migrations.runner import upgrade_to_head
from escrowd.wallets.keystore import UnlockedKeystore, load_passphrase, unlock_keystore

log = structlog.get_logger(__name__)


class _CliState(Protocol):
    @property
    def settings(self) -> Settings: ...

    @property
    def engine(self) -> Engine: ...


def _state(ctx: typer.Context) -> _CliState:
    state = ctx.find_root().obj
    assert hasattr(state, "settings") and hasattr(state, "engine"), "CliState not set up"
    return state  # type: ignore[no-any-return]


def _unlock(settings: Settings) -> UnlockedKeystore | None:
    path = settings.keystore_path
    if not path.exists():
        log.warning(
            "keystore_missing",
            path=str(path),
            detail="deposit addresses cannot be derived until `escrowd keys init` creates it",
        )
        return None
    passphrase = load_passphrase(
        env_name=settings.keystore.passphrase_env,
        passphrase_file=settings.keystore.passphrase_file,
        credential_name=settings.keystore.credential_name,
    )
    keystore = unlock_keystore(path, passphrase)
    log.info("keystore_unlocked", path=str(path), evm_account_xpub=keystore.evm_account_xpub)
    return keystore


def _exit(code: int) -> None:
    if code == 0:
        raise typer.Exit(0)
    # Ticks still running after the shutdown timeout would keep the interpreter alive.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# `--workers`, shared by `escrowd run` and `escrowd api`.
WorkersOption = Annotated[
    int,
    typer.Option(min=0, help="API worker processes (0: [api] workers, whose 0 is one per core)."),
]


def run(
    ctx: typer.Context,
    migrate: Annotated[
        bool, typer.Option("--migrate", help="Upgrade the schema to head before starting.")
    ] = False,
    role: Annotated[
        Role,
        typer.Option(
            help="all: API workers and the jobs; api: only the API (N instances behind a load"
            " balancer); worker: only the jobs (pollers, payouts, webhooks, expiry)."
        ),
    ] = Role.ALL,
    workers: WorkersOption = 0,
) -> None:
    """Run the daemon: pollers, payouts, expiry, webhooks, the HTTP API, /metrics."""
    _run(ctx, role=role, workers=workers, migrate=migrate)


def api(
    ctx: typer.Context,
    workers: WorkersOption = 0,
) -> None:
    """Serve only the HTTP API (`escrowd run --role api`)."""
    _run(ctx, role=Role.API, workers=workers, migrate=False)


def worker(ctx: typer.Context) -> None:
    """Run only the jobs: pollers, payouts, expiry, webhooks (`escrowd run --role worker`)."""
    _run(ctx, role=Role.WORKER, workers=0, migrate=False)


def _run(ctx: typer.Context, *, role: Role, workers: int, migrate: bool) -> None:
    state = _state(ctx)
    settings = state.settings
    configure_logging(
        fmt="json" if settings.log.format == "auto" else settings.log.format,
        level=settings.log.level,
    )
    if migrate:
        upgrade_to_head(state.engine)
    daemon = Daemon(
        settings,
        state.engine,
        parts=DaemonParts(keystore=_unlock(settings)),
        role=role,
        api_workers=workers,
    )
    _exit(run_daemon(daemon))


def dev(
    data_dir: Annotated[
        Path, typer.Option(help="Where the dev database, keystore and passphrase live.")
    ] = Path(".escrowd-dev"),
    demo: Annotated[
        bool, typer.Option("--demo", help="Run the scripted demo end to end, then exit.")
    ] = False,
    port: Annotated[int, typer.Option(help="API port on 127.0.0.1 (0: any free port).")] = 8725,
) -> None:
    """Everything on one machine with no set-up: SQLite, in-process EVM and Solana."""
    from escrowd.daemon.dev import run_dev

    configure_logging(fmt="console", level="warning" if demo else "info")
    _exit(run_dev(data_dir, demo=demo, port=port))
