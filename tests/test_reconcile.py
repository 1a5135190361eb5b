"""`escrowd reconcile`: on-chain custody against the ledger, exit 1 listing differences."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from sqlalchemy import Engine
from typer.testing import CliRunner

from escrowd.daemon.cli import CliState
from escrowd.daemon.cli_payouts import payouts_app, reconcile
from escrowd.escrow import service
from escrowd.escrow.reconcile import Line
from escrowd.models.db import make_engine
from tests.evm_fixtures import EvmChain, anvil_chain
from tests.payout_fixtures import PASSPHRASE, EvmPayoutWorld, make_evm_world, random_address

__all__ = ["anvil_chain"]


@pytest.fixture
def world(
    anvil_chain: EvmChain, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[EvmPayoutWorld]:
    monkeypatch.setenv("ESCROWD_KEYSTORE_PASSPHRASE", PASSPHRASE)
    engine: Engine = make_engine(sqlite_url)
    yield make_evm_world(anvil_chain, sqlite_url, engine, tmp_path)
    engine.dispose()


def _cli(config: Path) -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = CliState(config_path=config)

    app.command(name="reconcile")(reconcile)
    app.add_typer(payouts_app, name="payouts")
    return app


@pytest.mark.parametrize(
    ("on_chain", "held", "in_flight", "difference"),
    [
        (100, 100, 0, 0),
        (100, 100, 30, 0),  # hold placed, transfer not sent yet
        (70, 100, 30, 0),  # transfer mined, not yet settled in the ledger
        (60, 100, 30, -10),  # missing beyond what is in flight
        (105, 100, 30, 5),  # coins the ledger does not know about
        (0, 0, 0, 0),
    ],
)
def test_difference_allows_only_what_is_in_flight(
    on_chain: int, held: int, in_flight: int, difference: int
) -> None:
    line = Line("c", "USDC", on_chain=on_chain, held_by_ledger=held, in_flight=in_flight)
    assert line.difference == difference


@pytest.mark.anvil
def test_reconcile_command_exits_1_listing_differences(world: EvmPayoutWorld) -> None:
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, 7_000_000)
        payout_id = world.request(s, agent.id, random_address(), 2_000_000, "rec-1").id
    runner = CliRunner()
    app = _cli(world.config_path)

    clean = runner.invoke(app, ["reconcile"])
    assert clean.exit_code == 0, clean.output
    assert "anvil USDC: on chain 7000000, ledger holds 7000000, in flight 2000000" in clean.output

    world.worker().run_until_idle()
    listed = runner.invoke(app, ["payouts", "list"])
    assert f"{payout_id}\tanvil\tUSDC\t2000000\tconfirmed" in listed.output
    shown = runner.invoke(app, ["payouts", "show", str(payout_id)])
    assert "status: confirmed" in shown.output and "transaction: 0x" in shown.output
    assert runner.invoke(app, ["reconcile"]).exit_code == 0

    # Coins arrive in the hot wallet without any ledger entry.
    world.chain.token.mint(world.hot, 123)
    dirty = runner.invoke(app, ["reconcile"])
    assert dirty.exit_code == 1
    assert "DIFFERENCE anvil USDC: on chain 5000123, ledger holds 5000000" in dirty.output
    assert "off by 123" in dirty.output
