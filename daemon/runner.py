"""`escrowd run`: the scheduler's jobs, the HTTP API and the systemd protocol.

Roles (`escrowd run --role`): `all` forks the API worker processes (api_workers.py) and
runs the jobs in the supervising process itself, so a poll never holds a request's GIL;
`api` only supervises API workers, for N instances behind a load balancer; `worker` only
runs the jobs. A process with jobs serves /healthz, /readyz and /metrics on `[worker]`
host/port. `escrowd dev` (role None) keeps the API on a thread of the one process: its
simulators live in that process's memory.

Start-up: check the schema is at head, fork the API workers (before any thread starts),
build the jobs, schedule them, then tell systemd READY=1. While running, ping the
watchdog only while the daemon itself works: the scheduler keeps starting ticks, no tick
hangs, and the API answers (an API worker that dies stops the daemon, exit 1). A job that
fails (one chain's node down) is the instance's readiness problem, not a reason for
systemd to restart everything: /readyz, the metrics and a `chain_unavailable` /
`job_failing` event report it while the other chains and the API keep serving. On
SIGTERM/SIGINT: stop accepting requests (SIGTERM to each API worker) and scheduling
ticks, let the requests and ticks in flight finish, and exit 0; if they do not finish
within `daemon.shutdown_timeout_s`, exit 1 and let the database roll back whatever was
still open.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType

import httpx
import structlog
import uvicorn
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from fastapi import FastAPI
from sqlalchemy import Engine

from escrowd.config.errors import Unavailable
from escrowd.config.settings import Settings
from escrowd.daemon.api import create_app
from escrowd.daemon.api_workers import ApiStartFailed, ApiWorkerPool, default_worker_count
from escrowd.daemon.health import ReadinessProbe, create_health_app, mount_health
from escrowd.daemon.jobs import Job, JobContext, JobRunner, build_jobs, locks_for
from escrowd.daemon.notify import Notifier
from escrowd.daemon.progress import JobProgress, LagTracker
from escrowd.escrow.payouts import PlatformAddresses
from escrowd.indexer.evm_source import EvmSource
from escrowd.indexer.solana_source import SolanaSource
from escrowd.migrations.runner import current_revision, head_revision
from escrowd.models.db import make_session_factory
from escrowd.wallets.allocation import AddressDeriver
from escrowd.wallets.keystore import UnlockedKeystore

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_SHUTDOWN_TIMEOUT = 1
# An API worker process died: exit non-zero so systemd (Restart=on-failure) starts afresh.
EXIT_API_WORKER_EXITED = 1
API_START_TIMEOUT_S = 15.0
# Without a systemd watchdog the loop still wakes up to refresh STATUS and the log.
IDLE_LOOP_S = 1.0
# How often the watch loop asks the API's own /healthz, and how long it waits.
API_CHECK_INTERVAL_S = 2.0
API_CHECK_TIMEOUT_S = 5.0


class SchemaNotAtHead(Unavailable):
    type = "schema_not_at_head"


class Role(enum.StrEnum):
    ALL = "all"
    API = "api"
    WORKER = "worker"


@dataclass
class DaemonParts:
    """Optional pieces `escrowd dev` and tests swap in: simulator sources, an unlocked
    keystore, extra jobs (e.g. mining the simulators)."""

    evm_sources: Mapping[str, EvmSource] = field(default_factory=dict)
    solana_source: SolanaSource | None = None
    keystore: UnlockedKeystore | None = None
    extra_jobs: list[Job] = field(default_factory=list)
    environ: Mapping[str, str] | None = None


def derivers_of(keystore: UnlockedKeystore | None, settings: Settings) -> dict[str, AddressDeriver]:
    if keystore is None:
        return {}
    mint = settings.solana.usdc_mint if settings.solana is not None else None
    return {"evm": keystore.evm_deriver(), "solana": keystore.solana_deriver(mint)}


def platform_of(keystore: UnlockedKeystore | None, settings: Settings) -> PlatformAddresses | None:
    if keystore is None:
        return None
    mint = settings.solana.usdc_mint if settings.solana is not None else None
    return PlatformAddresses.of_keystore(keystore, mint)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        parts: DaemonParts | None = None,
        notifier: Notifier | None = None,
        serve_api: bool = True,
        role: Role | None = None,
        api_workers: int = 0,
    ) -> None:
        self.settings = settings
        self.role = role
        self.api_workers = api_workers
        self.engine = engine
        self.parts = parts or DaemonParts()
        self.notifier = notifier or Notifier()
        self.serve_api = serve_api
        self.stop_event = threading.Event()
        self.progress = JobProgress()
        self.lags = LagTracker(
            max_failed_polls=settings.daemon.unready_after_failed_polls,
            max_silence_s=settings.daemon.unready_after_no_poll_s,
        )
        self._api_answered = time.monotonic()
        self.runner: JobRunner | None = None
        self.jobs: list[Job] = []
        self.api_port: int | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        self._pool: ApiWorkerPool | None = None
        self._health_server: uvicorn.Server | None = None
        self._health_thread: threading.Thread | None = None
        self.worker_port: int | None = None
        self._exit_code = EXIT_OK
        self._closers: list[Callable[[], None]] = []
        self._status = ""
        self._running_status = ""

    # ---- start-up -----------------------------------------------------------------------

    def check_schema(self) -> None:
        current, head = current_revision(self.engine), head_revision()
        if current != head:
            raise SchemaNotAtHead(
                f"database schema is at {current or 'nothing'}, expected {head}: "
                "run `escrowd migrate` (or `escrowd run --migrate`)"
            )

    def app(self) -> FastAPI:
        keystore = self.parts.keystore
        app = create_app(
            self.settings,
            self.engine,
            deriver=derivers_of(keystore, self.settings),
            platform=platform_of(keystore, self.settings),
        )
        return mount_health(app, self.probe())

    def probe(self) -> ReadinessProbe:
        return ReadinessProbe(
            self.engine,
            self.lags,
            self.progress,
            failing_after_s=self.settings.daemon.unready_after_failing_s,
        )

    def start(self) -> None:
        self._set_status("starting")
        self.check_schema()
        if self.engine.dialect.name == "sqlite":
            log.warning(
                "sqlite_single_instance",
                detail="SQLite has no advisory locks: run exactly one daemon on this database",
            )
        if self.role in (Role.ALL, Role.API):
            self._start_api_workers()
        if self.role is Role.API:
            self._start_api_check()
            self._running_status = (
                f"serving the API on {self.settings.api.host}:{self.api_port} "
                f"({self._pool.count if self._pool else 0} workers)"
            )
            self._status = self._running_status
            self.notifier.ready(self._running_status)
            log.info("daemon_ready", role=self.role.value, jobs=[], api_port=self.api_port)
            return
        ctx = JobContext(
            settings=self.settings,
            engine=self.engine,
            sessions=make_session_factory(self.engine),
            evm_sources=dict(self.parts.evm_sources),
            solana_source=self.parts.solana_source,
            keystore=self.parts.keystore,
        )
        if self.parts.environ is not None:
            ctx.environ = self.parts.environ
        self.jobs = build_jobs(ctx) + list(self.parts.extra_jobs)
        self._closers.extend(ctx.closers)
        locks = locks_for(self.engine, max_holders=max(1, len(self.jobs)))
        self._closers.append(locks.close)
        self.runner = JobRunner(locks, self.progress, self.lags)
        if self.role is not None:
            self._start_worker_http()
        elif self.serve_api:
            self._start_api()
        if self._pool is not None:
            self._start_api_check()
        self._start_scheduler()
        where = ""
        if self.api_port is not None:
            where = f"; API on {self.settings.api.host}:{self.api_port}"
            if self._pool is not None:
                where += f" ({self._pool.count} workers)"
        self._running_status = f"running {len(self.jobs)} jobs{where}"
        self._status = self._running_status
        self.notifier.ready(self._running_status)
        log.info(
            "daemon_ready",
            role=self.role.value if self.role else "dev",
            jobs=[job.name for job in self.jobs],
            api_port=self.api_port,
            worker_port=self.worker_port,
        )

    def api_worker_count(self) -> int:
        if self.engine.dialect.name == "sqlite":
            # One writer at a time anyway, and a second process only adds lock waits.
            return 1
        return self.api_workers or self.settings.api.workers or default_worker_count()

    def _start_api_workers(self) -> None:
        # Forked children must not share the parent's database sockets.
        self.engine.dispose()
        pool = ApiWorkerPool(
            self.app,
            host=self.settings.api.host,
            port=self.settings.api.port,
            count=self.api_worker_count(),
            graceful_timeout_s=self.settings.daemon.shutdown_timeout_s,
        )
        self._pool = pool
        pool.start(API_START_TIMEOUT_S)
        self.api_port = pool.port
        log.info(
            "api_listening", host=self.settings.api.host, port=self.api_port, workers=pool.count
        )

    def _start_worker_http(self) -> None:
        host, port = self.settings.worker.host, self.settings.worker.port
        server, thread = self._serve_in_thread(create_health_app(self.probe()), host, port, "jobs")
        self._health_server, self._health_thread = server, thread
        self.worker_port = int(server.servers[0].sockets[0].getsockname()[1])
        log.info("worker_listening", host=host, port=self.worker_port)

    def _serve_in_thread(
        self, app: FastAPI, host: str, port: int, what: str
    ) -> tuple[uvicorn.Server, threading.Thread]:
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=what, daemon=True)
        thread.start()
        deadline = time.monotonic() + API_START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ApiStartFailed(
                    f"the {what} HTTP server did not start on {host}:{port}: "
                    "is the port in use? (see the log above)"
                )
            time.sleep(0.02)
        return server, thread

    def _start_scheduler(self) -> None:
        runner = self.runner
        assert runner is not None, "start() builds the runner first"
        # APScheduler warns on every tick a long job makes it skip; JobProgress and the
        # watchdog report a job that stops completing, once, as a fact.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=max(1, len(self.jobs)))},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone="UTC",
        )
        for job in self.jobs:
            runner.register(job)
            scheduler.add_job(
                runner.tick,
                IntervalTrigger(seconds=job.interval_s),
                args=[job],
                id=job.name,
                name=job.name,
                next_run_time=datetime.now(UTC),
            )
            log.info("job_scheduled", job=job.name, interval_s=job.interval_s)
        scheduler.start()
        self._scheduler = scheduler

    def _start_api(self) -> None:
        host, port = self.settings.api.host, self.settings.api.port
        server, thread = self._serve_in_thread(self.app(), host, port, "api")
        self.api_port = int(server.servers[0].sockets[0].getsockname()[1])
        self._server, self._server_thread = server, thread
        self._start_api_check()
        log.info("api_listening", host=host, port=self.api_port)

    def _start_api_check(self) -> None:
        self._api_answered = time.monotonic()
        threading.Thread(target=self._check_api, name="api-check", daemon=True).start()

    # ---- running ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def watch(self) -> None:
        """Until asked to stop: ping the watchdog while the daemon is not wedged, and
        report (log, STATUS) the jobs and chains that fail meanwhile."""
        interval_s = self.notifier.watchdog_interval_s or IDLE_LOOP_S
        stale_after_s = self.settings.daemon.watchdog_stale_s
        withheld: list[str] = []
        while not self.stop_event.wait(min(interval_s, IDLE_LOOP_S)):
            if self._pool is not None and (exited := self._pool.exited()):
                log.error("api_worker_exited", workers=exited)
                self._exit_code = EXIT_API_WORKER_EXITED
                return
            wedged = self.wedged(stale_after_s)
            # Evaluated every loop so their alert events are logged when they start.
            unready = sorted(self.lags.problems()) + [
                failing.job
                for failing in self.progress.failing(self.settings.daemon.unready_after_failing_s)
            ]
            if wedged:
                if wedged != withheld:
                    log.error("watchdog_withheld", stale_jobs=wedged, stale_after_s=stale_after_s)
                self._set_status(f"wedged: {', '.join(wedged)}")
            else:
                if withheld:
                    log.info("watchdog_resumed")
                self.notifier.watchdog()
                degraded = f"; degraded: {', '.join(unready)}" if unready else ""
                self._set_status(self._running_status + degraded)
            withheld = wedged

    def wedged(self, stale_after_s: float) -> list[str]:
        """What keeps the daemon from working: jobs stuck in a tick or no longer started
        (the scheduler stopped), and the API when it has not answered for as long."""
        wedged = self.progress.wedged(stale_after_s)
        if (self._server is not None or self._pool is not None) and not self._api_alive(
            stale_after_s
        ):
            wedged.append("api")
        return wedged

    def _api_alive(self, stale_after_s: float) -> bool:
        if self._pool is None:
            thread = self._server_thread
            if thread is None or not thread.is_alive():
                return False
        elif self._pool.exited():
            return False
        return time.monotonic() - self._api_answered <= stale_after_s

    def _check_api(self) -> None:
        """Ask the API's own /healthz now and then, from a thread of its own so a slow
        answer never delays a watchdog ping; `_api_answered` is when it last answered."""
        host = self.settings.api.host
        # A wildcard listen address is reached on loopback.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
        url = f"http://{f'[{host}]' if ':' in host else host}:{self.api_port}/healthz"
        # Asked a few times within the stale threshold, so one slow answer is no wedge.
        every_s = min(API_CHECK_INTERVAL_S, self.settings.daemon.watchdog_stale_s / 4)
        with httpx.Client(timeout=API_CHECK_TIMEOUT_S) as client:
            while not self.stop_event.wait(every_s):
                try:
                    if client.get(url).status_code == 200:
                        self._api_answered = time.monotonic()
                except httpx.HTTPError as exc:
                    log.warning("api_check_failed", error=f"{type(exc).__name__}: {exc}")

    def _set_status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self.notifier.status(status)

    # ---- shutdown -----------------------------------------------------------------------

    def shutdown(self) -> int:
        timeout_s = self.settings.daemon.shutdown_timeout_s
        deadline = time.monotonic() + timeout_s
        self.notifier.stopping("stopping: finishing jobs in flight")
        log.info("daemon_stopping", timeout_s=timeout_s)
        for server in (self._server, self._health_server):
            if server is not None:
                server.should_exit = True
        if self._pool is not None:
            self._pool.terminate()
        stopper: threading.Thread | None = None
        if self._scheduler is not None:
            scheduler = self._scheduler
            # shutdown(wait=True) returns once the ticks in flight have finished.
            stopper = threading.Thread(
                target=lambda: scheduler.shutdown(wait=True), name="scheduler-stop", daemon=True
            )
            stopper.start()
            stopper.join(max(0.0, deadline - time.monotonic()))
        threads = (stopper, self._server_thread, self._health_thread)
        for thread in threads:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = [thread.name for thread in threads if thread and thread.is_alive()]
        if self._pool is not None:
            unfinished += self._pool.join(deadline)
        if unfinished:
            log.error(
                "shutdown_timeout",
                timeout_s=timeout_s,
                waiting_on=unfinished,
                running_jobs=self.progress.running(),
            )
            return EXIT_SHUTDOWN_TIMEOUT
        for close in self._closers:
            close()
        log.info("daemon_stopped")
        return self._exit_code


def run_daemon(daemon: Daemon) -> int:
    """Start, run until SIGTERM/SIGINT, shut down; the process exit code."""
    daemon.install_signal_handlers()
    try:
        daemon.start()
    except Exception:
        daemon.stop_event.set()
        daemon.shutdown()
        raise
    daemon.watch()
    return daemon.shutdown()
