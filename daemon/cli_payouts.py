"""`escrowd payouts list|show`.

Mount in daemon/cli.py:

    from escrowd.daemon.cli_payouts import payouts_app
    app.add_typer(payouts_app, name="payouts")

It reads settings and the engine from the root context object (`CliState`), which has
``settings`` and ``engine`` properties.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from sqlalchemy import select

from escrowd.models import Asset, Payout, PayoutStatus, PayoutTransaction
from escrowd.models.db import make_session_factory

EXIT_PROBLEMS = 1
EXIT_USAGE = 2

payouts_app = typer.Typer(help="On-chain payouts: inspect their state.", no_args_is_help=True)


def _state(ctx: typer.Context) -> Any:
    state = ctx.find_root().obj
    assert hasattr(state, "settings") and hasattr(state, "engine")
    return state


@payouts_app.command("list")
def list_payouts(
    ctx: typer.Context,
    status: Annotated[PayoutStatus | None, typer.Option(help="Only payouts in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """The newest payouts: id, chain, asset, amount (base units), status, tx hash."""
    query = select(Payout, Asset.symbol).join(Asset, Asset.id == Payout.asset_id)
    if status is not None:
        query = query.where(Payout.status == status.value)
    with make_session_factory(_state(ctx).engine)() as session:
        for payout, symbol in session.execute(query.order_by(Payout.id.desc()).limit(limit)):
            typer.echo(
                f"{payout.id}\t{payout.chain}\t{symbol}\t{payout.amount}\t{payout.status}\t"
                f"{payout.reason}\t{payout.tx_hash or '-'}"
            )


@payouts_app.command("show")
def show_payout(ctx: typer.Context, payout_id: int) -> None:
    """One payout with every transaction signed for it (replacements included)."""
    with make_session_factory(_state(ctx).engine)() as session:
        payout = session.get(Payout, payout_id)
        if payout is None:
            typer.echo(f"escrowd: no payout {payout_id}", err=True)
            raise typer.Exit(EXIT_PROBLEMS)
        for name in (
            "id",
            "chain",
            "reason",
            "agent_id",
            "escrow_id",
            "source_address",
            "destination",
            "amount",
            "status",
            "claimed_by",
            "claimed_until",
            "nonce",
            "tx_hash",
            "last_valid_block_height",
            "block_number",
            "attempts",
            "error",
            "created_at",
            "broadcast_at",
            "confirmed_at",
        ):
            typer.echo(f"{name}: {getattr(payout, name)}")
        for tx in session.scalars(
            select(PayoutTransaction)
            .where(PayoutTransaction.payout_id == payout_id)
            .order_by(PayoutTransaction.id)
        ):
            typer.echo(
                f"transaction: {tx.tx_hash} nonce={tx.nonce} max_fee_per_gas={tx.max_fee_per_gas} "
                f"last_valid_block_height={tx.last_valid_block_height} at {tx.created_at}"
            )
