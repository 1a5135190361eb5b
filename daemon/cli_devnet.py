"""``escrowd devnet ...``: run local chain simulators in the foreground for manual use."""

from __future__ import annotations

import threading

import structlog
import typer

from escrowd.devnet.solana_rpc import SolanaSimulator

log = structlog.get_logger(__name__)

devnet_app = typer.Typer(help="Local chain simulators for development (never for real money).")


@devnet_app.callback()
def devnet() -> None:
    """Local chain simulators for development (never for real money)."""


@devnet_app.command("solana")
def solana(
    port: int = typer.Option(8899, help="TCP port for the JSON-RPC endpoint (0 = any free port)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    slot_ms: int = typer.Option(400, min=1, help="Milliseconds per slot."),
    skip_every_slots: int = typer.Option(
        7, min=0, help="Every Nth slot produces no block (0 = never skip)."
    ),
    usdc: bool = typer.Option(True, help="Create a 6-decimal USDC-like mint at start."),
) -> None:
    """Run the local Solana JSON-RPC simulator (LiteSVM) until Ctrl-C."""
    sim = SolanaSimulator(
        host=host,
        port=port,
        slot_ms=slot_ms,
        skip_every_slots=skip_every_slots or None,
    )
    sim.start()
    try:
        typer.echo(f"solana rpc: {sim.url}")
        if usdc:
            typer.echo(f"usdc mint: {sim.create_usdc_mint()}")
        # Block the main thread; Ctrl-C raises KeyboardInterrupt here.
        threading.Event().wait()
    except KeyboardInterrupt:
        log.info("solana_sim_stopping")
    finally:
        sim.stop()
