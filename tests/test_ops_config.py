"""The Grafana dashboard and the Prometheus alerts in config/ use only metrics the daemon
exports, and the README lists every alert."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from escrowd.config.settings import (
    EvmChainSettings,
    KeystoreSettings,
    ReconcileSettings,
    Settings,
    SolanaSettings,
)
from escrowd.daemon.health import ReadinessProbe, create_health_app
from escrowd.daemon.jobs import JobContext, build_jobs
from escrowd.daemon.progress import JobProgress, LagTracker
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.keystore import create_keystore
from escrowd.wallets.secrets import Secret

ROOT = Path(__file__).resolve().parents[1]
METRIC = re.compile(r"\bescrowd_[a-z0-9_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[dict[str, object]]:
    document = yaml.safe_load((ROOT / "config" / "prometheus-alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


@pytest.fixture
def exported(sqlite_url: str, tmp_path: Path) -> Iterator[set[str]]:
    """Every series name /metrics shows once the daemon's jobs are built with every
    optional part (keystore, Solana, reconcile)."""
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    keystore = create_keystore(tmp_path / "ks.json", Secret("pw"), scrypt_log2_n=10)
    settings = Settings(
        data_dir=tmp_path,
        keystore=KeystoreSettings(path=tmp_path / "ks.json"),
        reconcile=ReconcileSettings(enabled=True),
        evm_chains=[
            EvmChainSettings(
                name="base",
                chain_id=8453,
                rpc_urls=["http://127.0.0.1:9"],
                usdc_address="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
            )
        ],
        solana=SolanaSettings(
            rpc_urls=["http://127.0.0.1:9"],
            usdc_mint="EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v",
        ),
    )
    ctx = JobContext(
        settings=settings, engine=engine, sessions=sessions, keystore=keystore, environ={}
    )
    jobs = build_jobs(ctx)
    assert {"reconcile", "payouts:base", "sweeps:solana"} <= {job.name for job in jobs}
    probe = ReadinessProbe(engine, LagTracker(), JobProgress())
    text = TestClient(create_health_app(probe)).get("/metrics").text
    for close in ctx.closers:
        close()
    engine.dispose()
    names = set()
    for line in text.splitlines():
        found = METRIC.match(line.split(" ", 3)[2] if line.startswith("#") else line)
        if found:
            names.add(found.group(0))
    yield names


def _used(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def _known(name: str, exported: set[str]) -> bool:
    return name in exported or any(
        name.endswith(suffix) and name.removesuffix(suffix) in exported for suffix in SUFFIXES
    )


def test_dashboard_and_alerts_use_only_exported_metrics(exported: set[str]) -> None:
    used = _used(dashboard_exprs()) | _used([str(rule["expr"]) for rule in alert_rules()])
    assert len(used) > 15
    assert sorted(name for name in used if not _known(name, exported)) == []


def test_the_readme_lists_every_alert() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Alerts", 1)[1].split("\n## ", 1)[0]
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in section, rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket")  # type: ignore[index]
