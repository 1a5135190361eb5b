"""Scheduled jobs: what a job is, how one tick runs, and who may run it.

A job is a name, an interval and a callable. Each tick runs under a lock named after the
job: a PostgreSQL session-level advisory lock held on a dedicated connection for the
tick, so with several daemons on one database a job runs in exactly one of them at a time,
and when that daemon dies its connection closes, the lock is released and another daemon
takes the job on its next tick. SQLite is single-instance: the scheduler's own
`max_instances=1` is the lock there.

Every tick records its outcome (daemon/progress.py: wedged jobs for the systemd watchdog,
failing jobs for /readyz, Prometheus metrics) and, for chain pollers, what the poll said
about its chain, also when it failed (lag, head, error; for /readyz and the lag gauge).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import EvmChainSettings, Settings, SolanaSettings
from escrowd.daemon.progress import JobProgress, LagReading, LagTracker
from escrowd.escrow import audit, payout_worker, service, subscriptions, sweeps
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.escrow.errors import CheckpointBusy
from escrowd.escrow.reconcile import HotWallets, Report, reconcile_configured
from escrowd.escrow.unsupported import UnsupportedDepositRecorder
from escrowd.escrow.uow import in_transaction
from escrowd.escrow.webhook_delivery import run_webhooks
from escrowd.escrow.webhooks import SecretCipher
from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_poller import EvmPoller
from escrowd.indexer.evm_sender import EvmSender
from escrowd.indexer.evm_source import EvmSource, JsonRpcEvmSource
from escrowd.indexer.evm_tokens import TokenScanner
from escrowd.indexer.solana_indexer import SolanaPoller
from escrowd.indexer.solana_sender import SolanaSender
from escrowd.indexer.solana_source import SolanaRpcSource, SolanaSource
from escrowd.models import utcnow
from escrowd.wallets.keystore import UnlockedKeystore

log = structlog.get_logger(__name__)

JOB_DURATION = Histogram(
    "escrowd_job_duration_seconds",
    "Wall time of one completed scheduler job tick.",
    ["job"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
JOB_RUNS = Counter(
    "escrowd_job_runs_total",
    "Scheduler job ticks by outcome (ok, failed, skipped_locked: another instance has it).",
    ["job", "outcome"],
)
JOB_FAILURES = Counter("escrowd_job_failures_total", "Scheduler job ticks that raised.", ["job"])
RECONCILE_DIFFERENCE = Gauge(
    "escrowd_reconcile_difference_base_units",
    "Last reconcile's difference per chain and asset: on chain minus what the ledger "
    "explains (0 when consistent).",
    ["chain", "asset"],
)
RECONCILE_UNCREDITED = Gauge(
    "escrowd_reconcile_uncredited_base_units",
    "Last reconcile: deposits on chain, seen, not yet credited.",
    ["chain", "asset"],
)
RECONCILE_UNREADABLE = Gauge(
    "escrowd_reconcile_chain_unreadable",
    "1 when the last reconcile could not read the chain.",
    ["chain"],
)
RECONCILE_LAST_RUN = Gauge(
    "escrowd_reconcile_last_run_timestamp_seconds",
    "Unix time the chain was last reconciled (read or not).",
    ["chain"],
)
JOB_LAST_SUCCESS = Gauge(
    "escrowd_job_last_success_timestamp_seconds",
    "Unix time of the job's last successful tick in this instance.",
    ["job"],
)

# A poll tick's result, or the exception it raised -> what it tells about the chain.
LagOf = Callable[[object], LagReading]


@dataclass(frozen=True)
class LagProbe:
    chain: str
    unit: str
    max_lag: int
    lag_of: LagOf


@dataclass(frozen=True)
class Job:
    name: str
    interval_s: float
    run: Callable[[], object]
    lag: LagProbe | None = None

    def __post_init__(self) -> None:
        assert self.interval_s > 0, f"job {self.name}: interval must be positive"


def advisory_key(job_name: str) -> int:
    """A stable signed 64-bit key for pg_try_advisory_lock, namespaced to escrowd jobs."""
    digest = hashlib.sha256(b"escrowd-job:" + job_name.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class JobLocks(Protocol):
    def hold(self, job_name: str) -> AbstractContextManager[bool]:
        """True while this instance holds the job's lock."""
        ...

    def close(self) -> None: ...


class LocalLocks:
    """SQLite: one instance, so every tick may run (APScheduler prevents overlap)."""

    @contextmanager
    def hold(self, job_name: str) -> Iterator[bool]:
        yield True

    def close(self) -> None:
        return None


class PgAdvisoryLocks:
    """pg_try_advisory_lock on a dedicated autocommit connection held for the tick.

    The lock connections come from a pool of their own, one per job, so holding them
    never starves the jobs' and the API's own connections."""

    def __init__(self, engine: Engine, max_holders: int) -> None:
        assert max_holders >= 1
        self._engine = create_engine(
            engine.url,
            pool_size=max_holders,
            max_overflow=0,
            pool_pre_ping=True,
            isolation_level="AUTOCOMMIT",
        )

    @contextmanager
    def hold(self, job_name: str) -> Iterator[bool]:
        key = advisory_key(job_name)
        with self._engine.connect() as connection:
            acquired = bool(
                connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
            )
            try:
                yield acquired
            finally:
                if acquired:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})

    def close(self) -> None:
        self._engine.dispose()


def locks_for(engine: Engine, max_holders: int) -> JobLocks:
    if engine.dialect.name == "postgresql":
        return PgAdvisoryLocks(engine, max_holders)
    return LocalLocks()


class JobRunner:
    """Runs one tick of a job: lock, time, record; never lets an exception escape, so a
    failing job is logged with its traceback and simply runs again on its next tick."""

    def __init__(self, locks: JobLocks, progress: JobProgress, lags: LagTracker) -> None:
        self.locks = locks
        self.progress = progress
        self.lags = lags

    def register(self, job: Job) -> None:
        self.progress.register(job.name, job.interval_s)
        if job.lag is not None:
            self.lags.expect(job.lag.chain, job.lag.unit, job.lag.max_lag)

    def tick(self, job: Job) -> None:
        self.progress.started(job.name)
        error: str | None = None
        try:
            with self.locks.hold(job.name) as acquired:
                if not acquired:
                    JOB_RUNS.labels(job.name, "skipped_locked").inc()
                    if job.lag is not None:
                        self.lags.polled_elsewhere(job.lag.chain)
                    log.debug("job_skipped_locked", job=job.name)
                    return
                started = time.perf_counter()
                result = job.run()
                elapsed_s = time.perf_counter() - started
            JOB_DURATION.labels(job.name).observe(elapsed_s)
            JOB_RUNS.labels(job.name, "ok").inc()
            JOB_LAST_SUCCESS.labels(job.name).set_to_current_time()
            if job.lag is not None:
                # A poller reports RPC trouble in its result rather than raising; the
                # lag tracker judges it (failed polls, silence), not the job's failures.
                self.lags.record(job.lag.chain, job.lag.lag_of(result))
            log.debug("job_done", job=job.name, duration_s=round(elapsed_s, 4))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            JOB_RUNS.labels(job.name, "failed").inc()
            JOB_FAILURES.labels(job.name).inc()
            log.error(
                "job_failed",
                job=job.name,
                error=error,
                traceback="".join(traceback.format_exception(exc)),
            )
            if job.lag is not None:
                self.lags.record(job.lag.chain, job.lag.lag_of(exc))
        finally:
            self.progress.finished(job.name, error)


# --- the registry: which jobs this daemon runs ------------------------------------------


class JobUnavailable(Exception):
    """What a job needs is missing (the keystore for payouts and sweeps); it is not scheduled."""

    def __init__(self, job: str, module: str, reason: str) -> None:
        super().__init__(f"{job}: {module} {reason}")
        self.job = job
        self.module = module
        self.reason = reason


@dataclass
class JobContext:
    """What job builders need. `evm_sources` / `solana_source` override the RPC sources
    built from settings (`escrowd dev` passes its in-process simulators)."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    evm_sources: dict[str, EvmSource] = field(default_factory=dict)
    solana_source: SolanaSource | None = None
    keystore: UnlockedKeystore | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    closers: list[Callable[[], None]] = field(default_factory=list)


@dataclass(frozen=True)
class PollTick:
    """One poller tick: the poll's result and, when crediting failed, why."""

    poll: object
    confirm_error: str | None = None


def _poll_and_confirm(poller: Any) -> Callable[[], object]:
    """One tick of a chain poller: scan for new deposits, then credit the confirmed ones.
    An RPC failure while crediting fails the tick but keeps what the scan measured."""

    def run() -> object:
        polled = poller.poll_once()
        try:
            confirmed = poller.confirm_once()
        except RpcError as exc:
            log.warning("confirm_failed", chain=poller.chain, error=str(exc))
            return PollTick(polled, f"{type(exc).__name__}: {exc}")
        error = getattr(confirmed, "error", None)
        return PollTick(polled, None if error is None else str(error))

    return run


def _tick_reading(
    outcome: object,
    lag_attribute: str,
    measured: Callable[[object], LagReading] | None = None,
) -> LagReading:
    """What a tick's outcome says about its chain; `measured` reads the lag of a poll
    that succeeded without carrying it."""
    poll = outcome.poll if isinstance(outcome, PollTick) else outcome
    reading = LagReading.of(poll, lag_attribute)
    if reading.lag is None and reading.error is None and measured is not None:
        reading = measured(poll)
    if reading.lag is None and reading.error is None:
        reading = LagReading(head=reading.head, error="poll reported no lag")
    if reading.error is None and isinstance(outcome, PollTick) and outcome.confirm_error:
        reading = LagReading(reading.lag, reading.head, f"confirm: {outcome.confirm_error}")
    return reading


def _evm_lag(outcome: object) -> LagReading:
    return _tick_reading(outcome, "lag_blocks")


def _evm_source(ctx: JobContext, chain: EvmChainSettings) -> EvmSource:
    source = ctx.evm_sources.get(chain.name)
    if source is None:
        rpc = JsonRpcEvmSource.for_chain(chain)
        ctx.closers.append(rpc.close)
        ctx.evm_sources[chain.name] = source = rpc
    return source


def _solana_source(ctx: JobContext, solana: SolanaSettings) -> SolanaSource:
    if ctx.solana_source is None:
        rpc = SolanaRpcSource(
            solana.rpc_urls, timeout_s=solana.rpc_timeout_s, max_rounds=solana.rpc_max_retries + 1
        )
        ctx.closers.append(rpc.close)
        ctx.solana_source = rpc
    return ctx.solana_source


def evm_jobs(ctx: JobContext) -> list[Job]:
    jobs: list[Job] = []
    for chain in ctx.settings.evm_chains:
        name = f"evm_poll:{chain.name}"
        poller = EvmPoller(chain, _evm_source(ctx, chain), ctx.sessions, LedgerDepositSink())
        probe = LagProbe(chain.name, "blocks", chain.max_lag_blocks, _evm_lag)
        jobs.append(Job(name, chain.poll_interval_s, _poll_and_confirm(poller), probe))
        if chain.token_scan_interval_s > 0:
            scanner = TokenScanner(
                chain, _evm_source(ctx, chain), ctx.sessions, UnsupportedDepositRecorder()
            )
            jobs.append(
                Job(f"evm_tokens:{chain.name}", chain.token_scan_interval_s, scanner.scan_once)
            )
    return jobs


def _solana_lag(chain: str) -> LagOf:
    def gauge(poll: object) -> LagReading:
        # The Solana poller publishes its lag as a gauge rather than in its result.
        value = REGISTRY.get_sample_value("escrowd_solana_slots_behind", {"chain": chain})
        if value is None:
            return LagReading()
        scanned = getattr(poll, "scanned_through_slot", None)
        head = scanned + int(value) if isinstance(scanned, int) else None
        return LagReading(lag=int(value), head=head)

    return lambda outcome: _tick_reading(outcome, "lag_slots", gauge)


def solana_jobs(ctx: JobContext) -> list[Job]:
    solana = ctx.settings.solana
    if solana is None:
        return []
    name = f"solana_poll:{solana.name}"
    poller = SolanaPoller(solana, _solana_source(ctx, solana), ctx.sessions, LedgerDepositSink())
    probe = LagProbe(solana.name, "slots", solana.max_lag_slots, _solana_lag(solana.name))
    return [Job(name, solana.poll_interval_s, _poll_and_confirm(poller), probe)]


def _lease_releaser(worker: payout_worker.PayoutWorker) -> Callable[[], None]:
    def release() -> None:
        worker.release_claims()

    return release


def payout_jobs(ctx: JobContext) -> list[Job]:
    """One payout worker per chain, signing with the keystore's hot wallets."""
    if ctx.keystore is None:
        raise JobUnavailable("payouts", "keystore", "is not unlocked (no keystore file)")
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    chains: list[tuple[str, Any]] = []
    for evm in ctx.settings.evm_chains:
        sender = EvmSender(
            _evm_source(ctx, evm),
            ctx.keystore.evm_hot_wallet,
            chain=evm.name,
            chain_id=evm.chain_id,
            max_fee_gwei=evm.max_fee_gwei,
            confirmations=evm.confirmations,
        )
        chains.append((evm.name, payout_worker.EvmPayoutChain(sender)))
    solana = ctx.settings.solana
    if solana is not None:
        solana_sender = SolanaSender(
            _solana_source(ctx, solana), ctx.keystore.solana_hot_wallet, chain=solana.name
        )
        # With the deposit keys the Solana worker also sends the sweeps the sweep job queues.
        chains.append(
            (
                solana.name,
                payout_worker.SolanaPayoutChain(
                    solana_sender, deposit_key=ctx.keystore.derive_solana
                ),
            )
        )
    jobs = []
    for chain_name, chain in chains:
        options = payout_worker.WorkerOptions.of(ctx.settings, worker_id)
        worker = payout_worker.PayoutWorker(ctx.sessions, chain, options)
        # A pass releases its leases when it ends; this covers one cut short at shutdown.
        ctx.closers.append(_lease_releaser(worker))
        jobs.append(Job(f"payouts:{chain_name}", ctx.settings.payouts.interval_s, worker.run_once))
    return jobs


def sweep_jobs(ctx: JobContext) -> list[Job]:
    """Consolidate deposit-address balances into the hot wallet: EVM sweeps are sent by
    their own sweeper; Solana sweeps are queued here and sent by the payout worker."""
    if ctx.keystore is None:
        raise JobUnavailable("sweeps", "keystore", "is not unlocked (no keystore file)")
    keystore = ctx.keystore
    interval_s = ctx.settings.payouts.sweep_interval_s
    jobs: list[Job] = []
    for evm in ctx.settings.evm_chains:
        sweeper = sweeps.build_evm_sweeper(
            ctx.sessions, ctx.settings, evm.name, keystore, _evm_source(ctx, evm)
        )
        jobs.append(Job(f"sweeps:{evm.name}", interval_s, sweeper.run_once))
    solana = ctx.settings.solana
    if solana is not None:
        source = _solana_source(ctx, solana)
        minimums = {
            "SOL": ctx.settings.payouts.min_sol_lamports,
            "USDC": ctx.settings.payouts.min_usdc_base_units,
        }

        # The payout worker drives the sweeps found; RPC trouble here is reported once.
        health = sweeps.DiscoveryHealth(solana.name, ctx.settings.payouts.stalled_after_s)

        def discover() -> int:
            count = 0
            with health.attempt():
                count = sweeps.discover_solana_sweeps(
                    ctx.sessions,
                    source,
                    chain=solana.name,
                    hot_wallet=keystore.solana_hot_wallet.address,
                    min_base_units=minimums,
                )
            return count

        jobs.append(Job(f"sweeps:{solana.name}", interval_s, discover))
    return jobs


def publish_reconcile(report: Report) -> None:
    """The report as metrics and log events (`reconcile_difference` is one to alert on)."""
    for chain in report.chains:
        RECONCILE_LAST_RUN.labels(chain.chain).set_to_current_time()
        RECONCILE_UNREADABLE.labels(chain.chain).set(1 if chain.error else 0)
        for line in chain.lines:
            RECONCILE_DIFFERENCE.labels(chain.chain, line.asset).set(line.difference)
            RECONCILE_UNCREDITED.labels(chain.chain, line.asset).set(line.uncredited)
            if line.difference:
                log.error(
                    "reconcile_difference",
                    chain=chain.chain,
                    asset=line.asset,
                    at=chain.at,
                    difference=line.difference,
                    detail=line.describe(),
                )
    log.info(
        "reconcile_done",
        differences=len(report.differences),
        unreadable=[chain.chain for chain in report.unreadable],
    )


def reconcile_jobs(ctx: JobContext) -> list[Job]:
    """The optional reconcile job (`reconcile.enabled`), through the pollers' sources."""
    if not ctx.settings.reconcile.enabled:
        return []
    if ctx.keystore is None:
        raise JobUnavailable("reconcile", "keystore", "is not unlocked (no keystore file)")
    hot = HotWallets(
        evm=ctx.keystore.evm_hot_wallet.address, solana=ctx.keystore.solana_hot_wallet.address
    )
    evm_sources = {chain.name: _evm_source(ctx, chain) for chain in ctx.settings.evm_chains}
    solana = ctx.settings.solana
    solana_source = _solana_source(ctx, solana) if solana is not None else None

    def run() -> object:
        report = reconcile_configured(
            ctx.sessions, ctx.settings, hot, evm_sources=evm_sources, solana_source=solana_source
        )
        publish_reconcile(report)
        return report

    return [Job("reconcile", ctx.settings.reconcile.interval_s, run)]


def expiry_jobs(ctx: JobContext) -> list[Job]:
    def run() -> object:
        return in_transaction(
            ctx.sessions, lambda session: service.expire_due_escrows(session, utcnow())
        )

    return [Job("escrow_expiry", ctx.settings.escrow.expiry_interval_s, run)]


def subscription_jobs(ctx: JobContext) -> list[Job]:
    settings = ctx.settings.subscriptions
    policy = subscriptions.ChargePolicy.of(settings)

    def run() -> object:
        return subscriptions.charge_all_due(
            ctx.sessions, policy, batch_size=settings.batch_size, budget_s=settings.interval_s
        )

    return [Job("subscriptions", settings.interval_s, run)]


def webhook_jobs(ctx: JobContext) -> list[Job]:
    settings = ctx.settings.webhooks
    client = httpx.Client(timeout=httpx.Timeout(settings.timeout_s), follow_redirects=False)
    ctx.closers.append(client.close)
    cipher_holder: list[SecretCipher] = []

    def run() -> object:
        # The key file is read on first use, so a daemon without webhooks never needs it.
        if not cipher_holder:
            cipher_holder.append(SecretCipher.from_settings(ctx.settings))
        return run_webhooks(ctx.sessions, cipher_holder[0], settings, client=client)

    return [Job("webhooks", settings.interval_s, run)]


def audit_checkpoint_jobs(ctx: JobContext) -> list[Job]:
    def run() -> object:
        try:
            return in_transaction(
                ctx.sessions, lambda session: audit.write_checkpoint(session, actor="scheduler")
            )
        except CheckpointBusy as exc:
            # A long writer (a backfill window) was in flight: the next run anchors it.
            log.warning("audit_checkpoint_deferred", reason=exc.message)
            return None

    return [Job("audit_checkpoint", ctx.settings.daemon.audit_checkpoint_interval_s, run)]


TEST_WEDGE_ENV = "ESCROWD_TEST_WEDGE_JOB"
TEST_PROBE_ENV = "ESCROWD_TEST_PROBE"
TEST_PROBE_INSTANCE_ENV = "ESCROWD_TEST_INSTANCE"
TEST_PROBE_INTERVAL_ENV = "ESCROWD_TEST_PROBE_INTERVAL_S"
TEST_PROBE_HOLD_ENV = "ESCROWD_TEST_PROBE_HOLD_S"


def probe_jobs(ctx: JobContext) -> list[Job]:
    """For the daemon's own tests: a job that records when it ran in which instance, so a
    test can check from the database that ticks never overlap across instances. The test
    creates the table escrowd_test_probe(instance, started_at, ended_at)."""
    if ctx.environ.get(TEST_PROBE_ENV) != "1":
        return []
    instance = ctx.environ.get(TEST_PROBE_INSTANCE_ENV, str(os.getpid()))
    interval_s = float(ctx.environ.get(TEST_PROBE_INTERVAL_ENV, "0.5"))
    hold_s = float(ctx.environ.get(TEST_PROBE_HOLD_ENV, "0.3"))
    insert = text(
        "INSERT INTO escrowd_test_probe (instance, started_at, ended_at) VALUES (:i, :s, :e)"
    )

    def run() -> object:
        started = time.time()
        time.sleep(hold_s)
        with ctx.engine.begin() as connection:
            connection.execute(insert, {"i": instance, "s": started, "e": time.time()})
        return None

    return [Job("test_probe", interval_s, run)]


JobBuilder = Callable[[JobContext], list[Job]]
BUILDERS: tuple[tuple[str, JobBuilder], ...] = (
    ("evm", evm_jobs),
    ("solana", solana_jobs),
    ("payouts", payout_jobs),
    ("sweeps", sweep_jobs),
    ("escrow_expiry", expiry_jobs),
    ("subscriptions", subscription_jobs),
    ("webhooks", webhook_jobs),
    ("audit_checkpoint", audit_checkpoint_jobs),
    ("reconcile", reconcile_jobs),
    ("test_probe", probe_jobs),
)


def _wedged(job: Job) -> Job:
    def run() -> object:
        log.warning("job_wedged_by_test_hook", job=job.name)
        threading.Event().wait()
        return None

    return Job(job.name, job.interval_s, run, job.lag)


def build_jobs(ctx: JobContext) -> list[Job]:
    """Every job this instance can run; a job whose prerequisite is missing (no keystore)
    is logged once (`job_unavailable`) and left out."""
    jobs: list[Job] = []
    for group, builder in BUILDERS:
        try:
            jobs.extend(builder(ctx))
        except JobUnavailable as exc:
            log.warning("job_unavailable", job=exc.job, module=exc.module, reason=exc.reason)
        else:
            log.debug("job_group_built", group=group)
    wedge = ctx.environ.get(TEST_WEDGE_ENV)
    return [_wedged(job) if job.name == wedge else job for job in jobs]
