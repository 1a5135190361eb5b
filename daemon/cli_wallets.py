"""`escrowd wallets`: the platform wallets' balances, needs and warnings, and booking the
coins operators put into them or take out (so `escrowd reconcile` expects them).

Exit codes: `wallets` / `wallets status` exit 1 when a wallet has a warning or its chain
could not be read; the booking commands exit 1 when the booking is refused.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from escrowd.config.errors import EscrowdError
from escrowd.config.settings import SettingsError
from escrowd.daemon.cli import state_of
from escrowd.escrow.payout_worker import unlock_from_settings
from escrowd.escrow.platform_wallets import WalletStatus, book, evm_status, solana_status
from escrowd.escrow.reconcile import configured_chains
from escrowd.indexer.evm_source import JsonRpcEvmSource
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.models.db import make_session_factory

EXIT_WARNINGS = 1
EXIT_REFUSED = 1
EXIT_USAGE = 2

wallets_app = typer.Typer(
    help="Platform wallets: balances, what each needs, booking operator funding.",
    rich_markup_mode=None,
)


def _check_chains(settings: Any, chains: list[str] | None) -> list[str]:
    known = configured_chains(settings)
    unknown = [name for name in chains or () if name not in known]
    if unknown:
        typer.echo(
            f"escrowd: unknown chain {', '.join(unknown)} (configured: "
            f"{', '.join(known) or 'none'})",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    return chains or known


def statuses(ctx: typer.Context, chains: list[str] | None) -> list[WalletStatus]:
    state = state_of(ctx)
    settings = state.settings
    selected = _check_chains(settings, chains)
    keystore = unlock_from_settings(settings)
    reserve = settings.wallets.reserve_transactions
    found: list[WalletStatus] = []
    with make_session_factory(state.engine, read_only=True)() as session:
        for evm in settings.evm_chains:
            if evm.name not in selected:
                continue
            with JsonRpcEvmSource.for_chain(evm) as source:
                found += evm_status(
                    session,
                    evm,
                    source,
                    hot_wallet=keystore.evm_hot_wallet.address,
                    gas_wallet=keystore.evm_gas_wallet.address,
                    reserve_transactions=reserve,
                )
        solana = settings.solana
        if solana is not None and solana.name in selected:
            with SolanaRpcSource(
                solana.rpc_urls,
                timeout_s=solana.rpc_timeout_s,
                max_rounds=solana.rpc_max_retries + 1,
            ) as rpc:
                found += solana_status(
                    session,
                    solana,
                    rpc,
                    hot_wallet=keystore.solana_hot_wallet.address,
                    reserve_transactions=reserve,
                )
    return found


def print_status(found: list[WalletStatus]) -> int:
    problems = 0
    for wallet in found:
        typer.echo(f"{wallet.chain} {wallet.role}: {wallet.address}")
        if wallet.error is not None:
            typer.echo(f"  cannot be read: {wallet.error}")
            problems += 1
            continue
        for holding in wallet.holdings:
            typer.echo(f"  holds {holding.describe()}")
        for need in wallet.needs:
            typer.echo(f"  needs {need}")
        for warning in wallet.warnings:
            typer.echo(f"  WARNING {warning}")
        problems += len(wallet.warnings)
    return EXIT_WARNINGS if problems else 0


ChainOption = Annotated[
    list[str] | None,
    typer.Option(
        "--chain", metavar="NAME", help="Only this network (repeatable); default: every one."
    ),
]


@wallets_app.callback(invoke_without_command=True)
def wallets(ctx: typer.Context, chain: ChainOption = None) -> None:
    """Each platform wallet: address, on-chain balances, what it needs and why, warnings.
    Exit 1 when a wallet has a warning or cannot be read."""
    if ctx.invoked_subcommand is not None:
        return
    code = print_status(statuses(ctx, chain))
    if code:
        raise typer.Exit(code)


@wallets_app.command("status")
def status(ctx: typer.Context, chain: ChainOption = None) -> None:
    """The same as `escrowd wallets`."""
    code = print_status(statuses(ctx, chain))
    if code:
        raise typer.Exit(code)


def _book(
    ctx: typer.Context, chain: str, asset: str, amount: str, reference: str, *, withdrawal: bool
) -> None:
    state = state_of(ctx)
    _check_chains(state.settings, [chain])
    try:
        with make_session_factory(state.engine)() as session, session.begin():
            booked = book(
                session,
                state.settings,
                chain=chain,
                symbol=asset.upper(),
                amount=amount,
                reference=reference,
                withdrawal=withdrawal,
            )
    except SettingsError as exc:
        typer.echo(f"escrowd: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except EscrowdError as exc:
        typer.echo(f"escrowd: {exc.message}; nothing was booked", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    typer.echo(booked.describe("withdrawal" if withdrawal else "funding"))


@wallets_app.command("book-funding")
def book_funding(
    ctx: typer.Context,
    chain: Annotated[str, typer.Option(help="The network the coins were sent on.")],
    asset: Annotated[str, typer.Option(help="USDC, or SOL on Solana.")],
    amount: Annotated[str, typer.Option(help='Decimal amount, e.g. "250" or "0.5".')],
    reference: Annotated[
        str, typer.Option(help="What it was (ticket, tx hash); a repeat is a no-op.")
    ],
) -> None:
    """Book coins an operator sent to the chain's hot wallet (a float, SOL for fees), so
    reconcile expects them. Send the coins first, then book them."""
    _book(ctx, chain, asset, amount, reference, withdrawal=False)


@wallets_app.command("book-withdrawal")
def book_withdrawal(
    ctx: typer.Context,
    chain: Annotated[str, typer.Option(help="The network the coins left on.")],
    asset: Annotated[str, typer.Option(help="USDC, or SOL on Solana.")],
    amount: Annotated[str, typer.Option(help='Decimal amount, e.g. "100".')],
    reference: Annotated[
        str, typer.Option(help="What it was (ticket, tx hash); a repeat is a no-op.")
    ],
) -> None:
    """Book float an operator took out of the chain's hot wallet (at most what was booked
    in), so reconcile no longer expects it."""
    _book(ctx, chain, asset, amount, reference, withdrawal=True)
