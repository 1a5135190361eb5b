"""`escrowd keys ...` and `escrowd address ...`: keystore set-up and deposit addresses.

Mount in daemon/cli.py:

    from escrowd.daemon.cli_keys import address_app, keys_app
    app.add_typer(keys_app, name="keys")
    app.add_typer(address_app, name="address")

Settings come from the root context's object when it has `.settings` (the main CLI's
CliState), else from `load_settings()` (ESCROWD_CONFIG / ESCROWD_* environment).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, NoReturn, Protocol

import typer
from sqlalchemy import select

from escrowd.config.errors import EscrowdError
from escrowd.config.settings import Settings, SettingsError, load_settings
from escrowd.models import Agent, Chain, DepositAddress
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.allocation import AddressDeriver, allocate_deposit_address, get_or_create_agent
from escrowd.wallets.errors import PassphraseUnavailable
from escrowd.wallets.keystore import (
    UnlockedKeystore,
    create_keystore,
    load_passphrase,
    unlock_keystore,
)
from escrowd.wallets.secrets import Secret

# Same codes as daemon.cli: 1 an operation failed, 2 bad usage or configuration.
EXIT_PROBLEMS = 1
EXIT_USAGE = 2

keys_app = typer.Typer(
    help="The encrypted keystore (seed and hot-wallet keys).", no_args_is_help=True
)
address_app = typer.Typer(help="Per-agent deposit addresses.", no_args_is_help=True)


class _HasSettings(Protocol):
    @property
    def settings(self) -> Settings: ...


def _fail(message: str, code: int = EXIT_PROBLEMS) -> NoReturn:
    typer.echo(f"escrowd: {message}", err=True)
    raise typer.Exit(code)


def _settings(ctx: typer.Context) -> Settings:
    state = ctx.find_root().obj
    try:
        if state is not None and hasattr(state, "settings"):
            holder: _HasSettings = state
            return holder.settings
        return load_settings(None)
    except SettingsError as exc:
        _fail(str(exc), EXIT_USAGE)


def _passphrase(settings: Settings) -> Secret[str]:
    return load_passphrase(
        env_name=settings.keystore.passphrase_env,
        passphrase_file=settings.keystore.passphrase_file,
        credential_name=settings.keystore.credential_name,
    )


def _unlock(settings: Settings) -> UnlockedKeystore:
    try:
        return unlock_keystore(settings.keystore_path, _passphrase(settings))
    except EscrowdError as exc:
        _fail(exc.message)


@keys_app.command("init")
def keys_init(ctx: typer.Context) -> None:
    """Create the keystore and show its mnemonic ONCE for an offline backup."""
    settings = _settings(ctx)
    path = settings.keystore_path
    if path.exists():
        _fail(f"keystore {path} already exists; refusing to overwrite it")
    try:
        passphrase = _passphrase(settings)
    except PassphraseUnavailable as exc:
        if not sys.stdin.isatty():
            _fail(exc.message)
        passphrase = Secret(
            typer.prompt("New keystore passphrase", hide_input=True, confirmation_prompt=True)
        )
    try:
        unlocked = create_keystore(path, passphrase, scrypt_log2_n=settings.keystore.scrypt_log2_n)
    except EscrowdError as exc:
        _fail(exc.message)
    typer.echo(
        "WARNING: the 24 words below are the only backup of every deposit address and hot "
        "wallet. Write them down offline now; they will never be shown again. Anyone who "
        "sees them can take the funds.",
        err=True,
    )
    # The single place a mnemonic is ever output.
    typer.echo(unlocked.mnemonic().reveal())
    typer.echo(f"keystore: {path}", err=True)
    typer.echo(f"evm account xpub: {unlocked.evm_account_xpub}", err=True)
    typer.echo(f"evm payout wallet: {unlocked.evm_hot_wallet.address}", err=True)
    typer.echo(f"evm gas wallet: {unlocked.evm_gas_wallet.address}", err=True)
    typer.echo(f"solana payout wallet: {unlocked.solana_hot_wallet.address}", err=True)


@keys_app.command("xpub")
def keys_xpub(ctx: typer.Context) -> None:
    """Print the EVM account xpub (m/44'/60'/0') for watch-only address derivation."""
    typer.echo(_unlock(_settings(ctx)).evm_account_xpub)


@address_app.command("new")
def address_new(
    ctx: typer.Context,
    agent: Annotated[str, typer.Option("--agent", help="The agent's external id.")],
    chain: Annotated[
        Chain,
        typer.Option(
            "--chain-family",
            "--chain",
            help="Chain family (--chain is its old name). One EVM address receives on every "
            "configured EVM network.",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full record as JSON.")] = False,
) -> None:
    """Give an agent its deposit address for a chain family (creating the agent if missing)."""
    settings = _settings(ctx)
    unlocked = _unlock(settings)
    deriver: AddressDeriver
    if chain is Chain.EVM:
        deriver = unlocked.evm_deriver()
    else:
        mint = settings.solana.usdc_mint if settings.solana is not None else None
        deriver = unlocked.solana_deriver(mint)
    row = _allocate(settings, agent, chain, deriver)
    if as_json:
        typer.echo(json.dumps(row))
    else:
        typer.echo(row["address"])


def _allocate(
    settings: Settings, agent: str, chain: Chain, deriver: AddressDeriver
) -> dict[str, str | int | None]:
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session, session.begin():
            agent_row = get_or_create_agent(session, agent)
            row = allocate_deposit_address(session, agent_row.id, chain, deriver)
            return {
                "agent": agent,
                "chain_family": row.chain,
                # The old name of chain_family, for scripts that read it.
                "chain": row.chain,
                "derivation_index": row.derivation_index,
                "address": row.address,
                "token_account": row.token_account,
            }
    except EscrowdError as exc:
        _fail(exc.message)
    finally:
        engine.dispose()


@address_app.command("list")
def address_list(
    ctx: typer.Context,
    chain: Annotated[
        Chain | None,
        typer.Option(
            "--chain-family", "--chain", help="Only this chain family (--chain: old name)."
        ),
    ] = None,
) -> None:
    """List deposit addresses: chain family, index, agent, address, token account."""
    settings = _settings(ctx)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            query = (
                select(DepositAddress, Agent.external_id)
                .join(Agent, Agent.id == DepositAddress.agent_id)
                .order_by(DepositAddress.chain, DepositAddress.derivation_index)
            )
            if chain is not None:
                query = query.where(DepositAddress.chain == chain.value)
            typer.echo("chain_family\tindex\tagent\taddress\ttoken_account")
            for row, external_id in session.execute(query):
                typer.echo(
                    f"{row.chain}\t{row.derivation_index}\t{external_id}\t{row.address}\t"
                    f"{row.token_account or '-'}"
                )
    finally:
        engine.dispose()
