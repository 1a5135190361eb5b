"""`escrowd apikey ...`: create, list and revoke API keys, and set their rate limits.

Mount in daemon/cli.py:

    from escrowd.daemon.cli_api import apikey_app
    app.add_typer(apikey_app, name="apikey")

The database comes from the root context's object when it has `.engine` (the main CLI's
CliState), else from `load_settings()` (ESCROWD_CONFIG / ESCROWD_* environment).
"""

from __future__ import annotations

import json
from typing import Annotated, NoReturn

import typer
from sqlalchemy import Engine

from escrowd.config.errors import EscrowdError
from escrowd.config.rate_limit import parse_limit
from escrowd.config.settings import SettingsError, load_settings
from escrowd.escrow import apikeys
from escrowd.escrow.uow import in_transaction
from escrowd.models import ApiScope
from escrowd.models.db import make_engine, make_session_factory

EXIT_PROBLEMS = 1

apikey_app = typer.Typer(help="API keys of the HTTP API.", no_args_is_help=True)


def _fail(message: str) -> NoReturn:
    typer.echo(f"escrowd: {message}", err=True)
    raise typer.Exit(EXIT_PROBLEMS)


def _engine(ctx: typer.Context) -> Engine:
    state = ctx.find_root().obj
    try:
        if state is not None and hasattr(state, "engine"):
            engine = state.engine
            assert isinstance(engine, Engine)
            return engine
        return make_engine(load_settings(None).resolved_database_url)
    except SettingsError as exc:
        _fail(str(exc))


@apikey_app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="Who the key is for.")],
    scope: Annotated[ApiScope, typer.Option("--scope", help="read, write or admin.")],
    rate_limit: Annotated[
        str | None,
        typer.Option(
            "--rate-limit",
            help="Requests per window, such as 100/60s; default: [api] rate_limit.",
        ),
    ] = None,
) -> None:
    """Create a key and print it once: only its hash is stored, it cannot be shown again."""
    sessions = make_session_factory(_engine(ctx))
    try:
        limit = parse_limit(rate_limit) if rate_limit is not None else None
        row, key = in_transaction(
            sessions,
            lambda s: apikeys.create_key(s, name=name, scope=scope, rate_limit=limit),
        )
    except EscrowdError as exc:
        _fail(exc.message)
    typer.echo(key)
    typer.echo(
        f"created API key {row.prefix} ({scope.value}) for {name}; store it now, "
        "it is not shown again",
        err=True,
    )


@apikey_app.command("list")
def list_keys(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every key's public prefix, name, scope and state (never the key itself)."""
    with make_session_factory(_engine(ctx), read_only=True)() as session:
        rows = apikeys.list_keys(session)
    for row in rows:
        state = "revoked" if row.revoked_at is not None else "active"
        own = apikeys.key_limit(row)
        limit = str(own) if own is not None else "default"
        if as_json:
            record = {
                "prefix": row.prefix,
                "name": row.name,
                "scope": row.scope,
                "state": state,
                "rate_limit": limit,
                "created_at": row.created_at.isoformat(),
            }
            typer.echo(json.dumps(record))
        else:
            typer.echo(f"{row.prefix}  {row.scope:<5}  {state:<7}  {limit:<14}  {row.name}")


@apikey_app.command("revoke")
def revoke(
    ctx: typer.Context,
    prefix: Annotated[str, typer.Argument(help="The key's public prefix (see `list`).")],
) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    sessions = make_session_factory(_engine(ctx))
    try:
        in_transaction(sessions, lambda s: apikeys.revoke_key(s, prefix))
    except EscrowdError as exc:
        _fail(exc.message)
    typer.echo(f"revoked API key {prefix}")


@apikey_app.command("set-limit")
def set_limit(
    ctx: typer.Context,
    prefix: Annotated[str, typer.Argument(help="The key's public prefix (see `list`).")],
    rate_limit: Annotated[
        str, typer.Argument(help="Requests per window, such as 100/60s, or 'default'.")
    ],
) -> None:
    """Give a key its own rate limit, or 'default' for [api] rate_limit; from its next
    request on, in every API process."""
    sessions = make_session_factory(_engine(ctx))
    try:
        limit = None if rate_limit == "default" else parse_limit(rate_limit)
        in_transaction(sessions, lambda s: apikeys.set_rate_limit(s, prefix, limit))
    except EscrowdError as exc:
        _fail(exc.message)
    typer.echo(f"API key {prefix}: rate limit {limit if limit is not None else 'default'}")
