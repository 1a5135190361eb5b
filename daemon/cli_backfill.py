"""`escrowd backfill evm --network NAME --from N [--to M]`: scan a historical block range for
deposits with the live poller's code, under a cursor of its own.

Mount in daemon/cli.py:

    from escrowd.daemon.cli_backfill import backfill_app
    app.add_typer(backfill_app, name="backfill")

The range's cursor is committed with each window's deposits, so an interrupted backfill
(Ctrl-C, crash) resumes where it stopped when the same command is run again. Deposits in
blocks already at confirmation depth are credited in their window's transaction (their
block hashes checked against the chain first); the rest, and any the daemon recorded
meanwhile, are credited by the confirmation step at the end (and by the daemon's
confirmation job in any case). `--no-confirm` only records them pending.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from escrowd.config.settings import EvmChainSettings, Settings
from escrowd.daemon.cli import state_of
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_poller import EvmPoller, WindowDone
from escrowd.indexer.evm_source import JsonRpcEvmSource
from escrowd.models.db import make_session_factory

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Consecutive failed windows before the backfill gives up (the source already retried).
MAX_FAILURES = 5
# Allocations between young-generation collections during a backfill (Python's default: 700).
BACKFILL_GC_THRESHOLD = 50_000

backfill_app = typer.Typer(help="Scan historical block ranges for deposits.", no_args_is_help=True)


def _chain(settings: Settings, name: str) -> EvmChainSettings:
    for chain in settings.evm_chains:
        if chain.name == name:
            return chain
    known = ", ".join(c.name for c in settings.evm_chains) or "none configured"
    typer.echo(f"escrowd: no EVM network named {name!r} in the config ({known})", err=True)
    raise typer.Exit(EXIT_USAGE)


@contextmanager
def _collecting_for_a_backfill() -> Iterator[None]:
    """The garbage collector set for a backfill, as long as it runs.

    Everything alive at the start (modules, settings, engine) lasts as long as the command.
    A backfill allocates millions of short-lived objects, and every full collection they
    trigger would walk that static heap again (~0.5 s per 50,000 logs): it is frozen out
    of them. The short-lived objects die by reference count, not in cycles: a young
    collection every 700 allocations (Python's default) still cost ~6 % of the crediting
    CPU (800 collections per 25,000 deposits), one every BACKFILL_GC_THRESHOLD next to
    nothing."""
    gc.freeze()
    threshold = gc.get_threshold()
    gc.set_threshold(BACKFILL_GC_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)


def backfill_key(from_block: int, to_block: int | None) -> str:
    """One cursor per requested range: re-running the same command resumes it."""
    return f"backfill:{from_block}-{'head' if to_block is None else to_block}"


def _progress(done: int, total: int, found: int, elapsed_s: float) -> str:
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    percent = 100 * done // total if total else 100
    return (
        f"\rblocks {done}/{total} ({percent}%)  {rate:,.0f} blocks/s  "
        f"deposits {found}  ETA {eta}   "
    )


def _last_block(source: JsonRpcEvmSource, chain: str, from_block: int, to_block: int | None) -> int:
    """The range's last block: ``to_block``, or the head now. A range that starts or ends
    above the head is refused at once (exit 2) rather than waited for."""
    try:
        head = source.head()
    except RpcError as exc:
        typer.echo(f"escrowd: cannot read the head of {chain}: {exc}", err=True)
        raise typer.Exit(EXIT_PROBLEMS) from None
    for option, block in (("--from", from_block), ("--to", to_block)):
        if block is not None and block > head:
            typer.echo(
                f"escrowd: {option} {block} is above the head of {chain} (block {head}); "
                "a backfill scans blocks that exist: lower it (omit --to to scan to the head)",
                err=True,
            )
            raise typer.Exit(EXIT_USAGE)
    return head if to_block is None else to_block


@backfill_app.command("evm")
def backfill_evm(
    ctx: typer.Context,
    chain: Annotated[
        str,
        typer.Option(
            "--network", "--chain", help="A configured EVM network (--chain: its old name)."
        ),
    ],
    from_block: Annotated[int, typer.Option("--from", min=0, help="First block to scan.")],
    to_block: Annotated[
        int | None, typer.Option("--to", min=0, help="Last block (default: the head).")
    ] = None,
    confirm: Annotated[
        bool, typer.Option(help="Credit the deposits that are deep enough when done.")
    ] = True,
) -> None:
    """Scan [FROM, TO] for USDC deposits into watched addresses; resumable."""
    state = state_of(ctx)
    settings = _chain(state.settings, chain)
    if to_block is not None and to_block < from_block:
        typer.echo(f"escrowd: --to {to_block} is before --from {from_block}", err=True)
        raise typer.Exit(EXIT_USAGE)
    sessions = make_session_factory(state.engine)
    with JsonRpcEvmSource.for_chain(settings) as source, _collecting_for_a_backfill():
        last = _last_block(source, settings.name, from_block, to_block)
        poller = EvmPoller(
            settings,
            source,
            sessions,
            LedgerDepositSink(),
            cursor_key=backfill_key(from_block, to_block),
            start_block=from_block,
            stop_block=last,
            track_reorgs=False,
            credit_final=confirm,
        )
        started = time.monotonic()
        scanned = found = failures = 0

        def window_done(window: WindowDone) -> None:
            nonlocal scanned, found, failures
            failures = 0
            scanned += window.blocks_scanned
            found += window.deposits_found
            done = window.scanned_to - from_block + 1
            total = last - from_block + 1
            typer.echo(
                _progress(done, total, found, time.monotonic() - started), err=True, nl=False
            )

        try:
            while True:
                result = poller.poll_once(on_window=window_done)
                if result.error is not None:
                    failures += 1
                    typer.echo(f"\nwindow failed ({failures}): {result.error}", err=True)
                    if failures >= MAX_FAILURES:
                        typer.echo("escrowd: giving up; run again to resume", err=True)
                        raise typer.Exit(EXIT_PROBLEMS)
                    continue
                if result.done:
                    break
                if result.blocks_scanned == 0:
                    # The node answered a head below the range (a lagging replica): wait.
                    failures += 1
                    typer.echo(
                        f"\nno progress ({failures}): node head {result.head} is below block "
                        f"{last}; waiting",
                        err=True,
                    )
                    if failures >= MAX_FAILURES:
                        typer.echo("escrowd: giving up; run again to resume", err=True)
                        raise typer.Exit(EXIT_PROBLEMS)
                    time.sleep(settings.poll_interval_s)
        except KeyboardInterrupt:
            typer.echo(
                f"\ninterrupted after {scanned} blocks; run the same command to resume", err=True
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
        elapsed_s = time.monotonic() - started
        typer.echo(
            f"\nbackfill {settings.name} [{from_block}, {last}]: {scanned} blocks scanned, "
            f"{found} new deposits in {elapsed_s:.1f}s",
            err=True,
        )
        if confirm:
            started = time.monotonic()
            confirmed = poller.confirm_once()
            typer.echo(
                f"confirmed {confirmed.confirmed}, orphaned {confirmed.orphaned} "
                f"in {time.monotonic() - started:.2f}s",
                err=True,
            )
