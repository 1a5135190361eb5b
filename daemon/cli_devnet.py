"""``escrowd devnet ...``: run local chain simulators in the foreground for manual use."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Annotated

import structlog
import typer
from solders.keypair import Keypair

from escrowd.devnet import solana_faults
from escrowd.devnet.rpc_proxy import MODES, Fault, FaultSpecError, RpcProxy
from escrowd.devnet.solana_rpc import SolanaSimulator

log = structlog.get_logger(__name__)

devnet_app = typer.Typer(help="Local chain simulators for development (never for real money).")


@devnet_app.callback()
def devnet() -> None:
    """Local chain simulators for development (never for real money)."""


@devnet_app.command("solana")
def solana(
    *,
    port: Annotated[
        int, typer.Option(help="TCP port for the JSON-RPC endpoint (0 = any free port).")
    ] = 8899,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    slot_ms: Annotated[int, typer.Option(min=1, help="Milliseconds per slot.")] = 400,
    skip_every_slots: Annotated[
        int, typer.Option(min=0, help="Every Nth slot produces no block (0 = never skip).")
    ] = 7,
    first_slot: Annotated[
        int, typer.Option(min=0, help="Slot of the first block (mainnet: about 4e8).")
    ] = 0,
    usdc: Annotated[bool, typer.Option(help="Create a 6-decimal USDC-like mint at start.")] = True,
    mint_authority_file: Annotated[
        Path,
        typer.Option(
            help="Where to write the USDC mint authority's keypair (Solana CLI JSON, mode 0600)."
        ),
    ] = Path("escrowd-devnet-usdc-authority.json"),
    faults: Annotated[
        str, typer.Option(help="Fault switches at start: the JSON of PUT /simulator/faults.")
    ] = "",
) -> None:
    """Run the local Solana JSON-RPC simulator (LiteSVM) until Ctrl-C."""
    sim = SolanaSimulator(
        host=host,
        port=port,
        slot_ms=slot_ms,
        skip_every_slots=skip_every_slots or None,
        first_slot=first_slot,
    )
    if faults:
        try:
            sim.faults.configure(json.loads(faults))
        except (ValueError, solana_faults.FaultSpecError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--faults") from None
    sim.start()
    try:
        typer.echo(f"solana rpc: {sim.url}")
        typer.echo(f"fault switches: {sim.url}/simulator/faults")
        if usdc:
            typer.echo(f"usdc mint: {sim.create_usdc_mint()}")
            _write_keypair(mint_authority_file, sim.mint_authority)
            typer.echo(f"usdc mint authority keypair: {mint_authority_file.resolve()}")
        # Block the main thread; Ctrl-C raises KeyboardInterrupt here.
        threading.Event().wait()
    except KeyboardInterrupt:
        log.info("solana_sim_stopping")
    finally:
        sim.stop()


@devnet_app.command("proxy")
def proxy(
    *,
    upstream: Annotated[
        list[str],
        typer.Option("--upstream", metavar="URL", help="JSON-RPC URL of a node (repeat for more)."),
    ],
    port: int = typer.Option(8546, help="TCP port to listen on (0 = any free port)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    mode: str = typer.Option(
        "", help="first | round_robin | random (default: round_robin with several upstreams)."
    ),
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault", metavar="JSON", help='A fault to start with: \'{"kind": "hang"}\'.'
        ),
    ] = None,
    seed: int = typer.Option(0, help="Seed of the random mode."),
) -> None:
    """Run the fault-injecting JSON-RPC proxy in front of UPSTREAM node(s) until Ctrl-C.

    Switch faults while it runs: POST a fault as JSON to /_proxy/faults, DELETE
    /_proxy/faults to clear them, GET /_proxy/stats to see what it served."""
    chosen = mode or ("round_robin" if len(upstream) > 1 else "first")
    if chosen not in MODES:
        typer.echo(f"escrowd: --mode must be one of {', '.join(MODES)}", err=True)
        raise typer.Exit(2)
    try:
        faults = [Fault.from_json(json.loads(spec)) for spec in fault or []]
    except (ValueError, FaultSpecError) as exc:
        typer.echo(f"escrowd: bad --fault: {exc}", err=True)
        raise typer.Exit(2) from None
    server = RpcProxy(upstream, host=host, port=port, mode=chosen, seed=seed)
    for item in faults:
        server.add(item)
    server.start()
    try:
        typer.echo(f"rpc proxy: {server.url} -> {', '.join(upstream)} ({chosen})")
        typer.echo(f"control: {server.control_url}/faults")
        threading.Event().wait()
    except KeyboardInterrupt:
        log.info("rpc_proxy_stopping")
    finally:
        server.stop()


def _write_keypair(path: Path, keypair: Keypair) -> None:
    """The keypair as the Solana CLI stores one (a JSON list of its 64 bytes), readable by
    its owner only: any tool can then mint test USDC. A throwaway development key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(list(bytes(keypair)), out)
    os.chmod(path, 0o600)
