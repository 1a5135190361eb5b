"""`escrowd payouts list|show|retry|cancel`.

Mount in daemon/cli.py:

    from escrowd.daemon.cli_payouts import payouts_app
    app.add_typer(payouts_app, name="payouts")

It reads settings and the engine from the root context object (`CliState`), which has
``settings`` and ``engine`` properties.
"""

from __future__ import annotations

import getpass
import socket
from typing import Annotated, NoReturn

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from escrowd.daemon.cli import state_of
from escrowd.escrow import payouts
from escrowd.escrow.payout_worker import landing_verdict
from escrowd.escrow.uow import in_transaction
from escrowd.indexer.errors import RpcError
from escrowd.models import Asset, Payout, PayoutStatus, PayoutTransaction
from escrowd.models.db import make_session_factory

EXIT_PROBLEMS = 1
EXIT_USAGE = 2

payouts_app = typer.Typer(
    help="On-chain payouts: inspect them, retry or cancel one.", no_args_is_help=True
)


@payouts_app.command("list")
def list_payouts(
    ctx: typer.Context,
    status: Annotated[PayoutStatus | None, typer.Option(help="Only payouts in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """The newest payouts: id, chain, asset, amount (base units), status, reason, tx hash,
    and why one waits, was parked or cancelled."""
    query = select(Payout, Asset.symbol).join(Asset, Asset.id == Payout.asset_id)
    if status is not None:
        query = query.where(Payout.status == status.value)
    with make_session_factory(state_of(ctx).engine)() as session:
        for payout, symbol in session.execute(query.order_by(Payout.id.desc()).limit(limit)):
            why = f"\t{payout.status_reason}" if payout.status_reason else ""
            typer.echo(
                f"{payout.id}\t{payout.chain}\t{symbol}\t{payout.amount}\t{payout.status}\t"
                f"{payout.reason}\t{payout.tx_hash or '-'}{why}"
            )


@payouts_app.command("show")
def show_payout(ctx: typer.Context, payout_id: int) -> None:
    """One payout with every transaction signed for it (replacements included)."""
    with make_session_factory(state_of(ctx).engine)() as session:
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
            "status_reason",
            "attention_from",
            "step_errors",
            "failing_since",
            "retry_at",
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


# An operator's claim on a payout lasts while the chain is checked, plus this margin.
OPERATOR_LEASE_MARGIN_S = 60.0


def _operator() -> str:
    return f"operator:{getpass.getuser()}@{socket.gethostname()}"[:64]


def _fail(message: str) -> NoReturn:
    typer.echo(f"escrowd: {message}", err=True)
    raise typer.Exit(EXIT_PROBLEMS)


@payouts_app.command("retry")
def retry(ctx: typer.Context, payout_id: int) -> None:
    """Hand a payout back to the workers now: one in needs_attention resumes where it was
    parked (its hold was kept); any other open one is tried at once, without its backoff."""
    sessions = make_session_factory(state_of(ctx).engine)
    operator = _operator()

    def work(session: Session) -> Payout:
        payouts.take_for_operator(session, payout_id, operator, OPERATOR_LEASE_MARGIN_S)
        return payouts.retry_payout(session, payout_id, operator=operator)

    try:
        payout = in_transaction(sessions, work)
    except (payouts.PayoutNotFound, payouts.PayoutStateConflict) as exc:
        _fail(exc.message)
    typer.echo(f"payout {payout_id}: {payout.status}; the next payouts pass takes it")


@payouts_app.command("cancel")
def cancel(
    ctx: typer.Context,
    payout_id: int,
    reason: Annotated[str, typer.Option(help="Why, for the audit row and the webhook.")],
    wait_s: Annotated[
        float,
        typer.Option(
            min=0,
            help="EVM: how long to wait for the confirmation depth over a nonce another "
            "transaction used.",
        ),
    ] = 300.0,
) -> None:
    """Cancel an open payout and give its hold back to the agent, only when the outcome is
    known: nothing was ever signed for it, or the chain shows none of its transactions can
    be mined any more (EVM: its nonce used by another transaction at the confirmation
    depth; Solana: the blockhash expired and no signature is known). Exit 1 otherwise."""
    state = state_of(ctx)
    sessions = make_session_factory(state.engine)
    operator = _operator()
    try:
        in_transaction(
            sessions,
            lambda s: payouts.take_for_operator(
                s, payout_id, operator, wait_s + OPERATOR_LEASE_MARGIN_S
            ),
        )
    except (payouts.PayoutNotFound, payouts.PayoutStateConflict) as exc:
        _fail(exc.message)
    try:
        verdict = landing_verdict(state.settings, sessions, payout_id, wait_s=wait_s)
        if verdict is not None and verdict.may_land:
            _fail(f"payout {payout_id} is not cancelled: {verdict.explanation}")
        evidence = None if verdict is None else verdict.explanation
        payout = in_transaction(
            sessions,
            lambda s: payouts.cancel_payout(
                s, payout_id, operator=operator, reason=reason, evidence=evidence
            ),
        )
    except payouts.PayoutStateConflict as exc:
        _fail(exc.message)
    except RpcError as exc:
        _fail(f"payout {payout_id} is not cancelled: the chain could not be read ({exc})")
    finally:
        in_transaction(sessions, lambda s: payouts.release_operator_claim(s, payout_id, operator))
    held = "" if payout.reason == "sweep" else f"; {payout.amount} base units back to the agent"
    typer.echo(f"payout {payout_id}: cancelled{held}")
