"""`escrowd tokens list` / `escrowd tokens recover`: ERC-20 tokens other than USDC that
arrived at deposit addresses (recorded by the daemon's token scan, never credited), and
moving one of them out to a named destination, exactly once (escrow/token_recovery.py).
"""

from __future__ import annotations

import getpass
from typing import Annotated

import typer

from escrowd.config.errors import Conflict, EscrowdError, NotFound, ValidationFailed
from escrowd.config.settings import SettingsError
from escrowd.daemon.cli import state_of
from escrowd.escrow.token_recovery import RecoveryRequest, TokenRecoverer
from escrowd.escrow.unsupported import list_unsupported_deposits
from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_source import JsonRpcEvmSource
from escrowd.models.db import make_session_factory
from escrowd.wallets.addresses import validate_evm_address, validate_evm_destination

EXIT_PROBLEMS = 1
EXIT_USAGE = 2

tokens_app = typer.Typer(
    help="Tokens escrowd does not credit, sent to deposit addresses: list, recover.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"escrowd: {message}", err=True)
    return typer.Exit(code)


def _address(option: str, value: str, *, destination: bool = False) -> str:
    try:
        return validate_evm_destination(value) if destination else validate_evm_address(value)
    except ValidationFailed as exc:
        raise _fail(f"{option}: {exc.message}", EXIT_USAGE) from None


@tokens_app.command("list")
def list_tokens(
    ctx: typer.Context,
    chain: Annotated[str | None, typer.Option(help="Only this EVM network.")] = None,
    address: Annotated[str | None, typer.Option(help="Only this deposit address.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Rows to show.")] = 100,
) -> None:
    """Unsupported deposits, oldest first: network, token, amount, address, agent."""
    state = state_of(ctx)
    wanted = _address("--address", address) if address is not None else None
    with make_session_factory(state.engine)() as session:
        rows = list_unsupported_deposits(session, chain=chain, address=wanted, limit=limit)
    if not rows:
        typer.echo("no unsupported deposits")
        return
    for view in rows:
        d = view.deposit
        recovered = f"recovered by #{d.recovery_id}" if d.recovery_id else "not recovered"
        typer.echo(
            f"#{d.id} {d.chain} token {d.token_address} amount {d.amount_base_units} base units "
            f"to {d.to_address} (agent {view.agent}) tx {d.tx_hash}:{d.log_index} "
            f"block {d.block_number} {recovered}"
        )


@tokens_app.command("recover")
def recover(
    ctx: typer.Context,
    *,
    chain: Annotated[str, typer.Option(help="The EVM network (a configured chain's name).")],
    token: Annotated[str, typer.Option(help="The token's contract address.")],
    address: Annotated[str, typer.Option(help="The deposit address holding it.")],
    to: Annotated[str, typer.Option("--to", help="Where the tokens go.")],
    amount_base_units: Annotated[
        int | None, typer.Option(min=1, help="Base units to move (default: all it holds).")
    ] = None,
    wait_s: Annotated[
        float, typer.Option(min=0, help="How long to follow it before returning.")
    ] = 120.0,
    operator: Annotated[
        str | None, typer.Option(help="Who asks, for the audit trail (default: $USER).")
    ] = None,
) -> None:
    """Move TOKEN from deposit ADDRESS to TO, exactly once; run again to resume."""
    state = state_of(ctx)
    try:
        settings = state.settings.evm_chain(chain)
    except SettingsError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    request = RecoveryRequest(
        chain=settings.name,
        token=_address("--token", token),
        address=_address("--address", address),
        destination=_address("--to", to, destination=True),
        amount_base_units=amount_base_units,
        operator=operator or getpass.getuser(),
    )
    from escrowd.escrow.payout_worker import unlock_from_settings

    try:
        keystore = unlock_from_settings(state.settings)
    except EscrowdError as exc:
        raise _fail(f"the keystore is needed to sign: {exc.message}", EXIT_PROBLEMS) from None
    with JsonRpcEvmSource.for_chain(settings) as source:
        recoverer = TokenRecoverer(
            make_session_factory(state.engine),
            settings,
            source,
            gas_wallet=keystore.evm_gas_wallet,
            deposit_key=keystore.derive_evm,
        )
        try:
            progress = recoverer.run(request, wait_s=wait_s, pause_s=settings.poll_interval_s)
        except ValidationFailed as exc:
            raise _fail(exc.message, EXIT_USAGE) from None
        except (Conflict, NotFound, RpcError) as exc:
            raise _fail(str(exc), EXIT_PROBLEMS) from None
    summary = (
        f"recovery #{progress.recovery_id}: {progress.amount_base_units} base units of "
        f"{request.token} from {request.address} to {request.destination}"
    )
    if progress.status == "confirmed":
        typer.echo(f"{summary}: confirmed in block {progress.block_number}, tx {progress.tx_hash}")
        return
    if progress.status == "failed":
        raise _fail(f"{summary}: the transfer reverted (tx {progress.tx_hash})", EXIT_PROBLEMS)
    raise _fail(
        f"{summary}: still {progress.status} ({progress.step}, tx {progress.tx_hash}); run the "
        "same command again to follow it (it resends the stored transaction, never a new one)",
        EXIT_PROBLEMS,
    )
