"""`escrowd reconcile`: on-chain custody against the ledger, chain by chain.

Exit codes: 0 every chain read and consistent; 1 a real difference (listed); 3 no
difference, but some chain could not be read (named, with its error). An alert on exit 1
is about money, one on exit 3 about a node.
"""

from __future__ import annotations

from typing import Annotated

import typer

from escrowd.config.settings import SettingsError
from escrowd.daemon.cli import state_of
from escrowd.escrow.payout_worker import unlock_from_settings
from escrowd.escrow.reconcile import ChainReport, HotWallets, Report, reconcile_configured
from escrowd.models.db import make_session_factory

EXIT_DIFFERENCE = 1
EXIT_USAGE = 2
EXIT_UNREADABLE = 3


def print_chain(report: ChainReport) -> None:
    if report.error is not None:
        typer.echo(f"{report.chain} ({report.family}): cannot be read: {report.error}")
        return
    typer.echo(f"{report.chain} ({report.family}) at {report.at}:")
    for line in report.lines:
        typer.echo(f"  {line.describe()}")
    for deposit in report.uncredited:
        typer.echo(f"  seen, not yet credited: {deposit.describe()}")
    if report.open_sweeps:
        typer.echo(f"  sweeps under way: {report.open_sweeps} (custody to custody, counted once)")


def print_report(report: Report) -> int:
    """Print the report; the exit code it calls for."""
    for chain in report.chains:
        print_chain(chain)
    found = report.differences
    for difference in found:
        typer.echo(f"DIFFERENCE {difference.describe()}", err=True)
    for chain in report.unreadable:
        typer.echo(f"UNREADABLE {chain.chain}: {chain.error}", err=True)
    if found:
        typer.echo(f"reconcile: {len(found)} difference(s)", err=True)
        return EXIT_DIFFERENCE
    if report.unreadable:
        names = ", ".join(chain.chain for chain in report.unreadable)
        typer.echo(f"reconcile: no difference in the chains read; not read: {names}", err=True)
        return EXIT_UNREADABLE
    typer.echo("reconcile: on-chain custody matches the ledger")
    return 0


def reconcile(
    ctx: typer.Context,
    chain: Annotated[
        list[str] | None,
        typer.Option(
            "--chain", metavar="NAME", help="Only this network (repeatable); default: every one."
        ),
    ] = None,
) -> None:
    """Compare on-chain balances of the hot wallet and every deposit address with the
    ledger's custody, per chain and asset, each chain read at one block. Exit 1 listing
    each difference; exit 3 when a chain could not be read."""
    state = state_of(ctx)
    settings = state.settings
    keystore = unlock_from_settings(settings)
    hot = HotWallets(evm=keystore.evm_hot_wallet.address, solana=keystore.solana_hot_wallet.address)
    try:
        report = reconcile_configured(
            make_session_factory(state.engine, read_only=True), settings, hot, chains=chain or None
        )
    except SettingsError as exc:
        typer.echo(f"escrowd: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    code = print_report(report)
    if code:
        raise typer.Exit(code)
