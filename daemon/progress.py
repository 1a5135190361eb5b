"""What the daemon knows about its own jobs: which are wedged, which are failing, and how
far each chain poller is behind.

Two different questions, kept apart on purpose:
- **Wedged** (`JobProgress.wedged`): a tick has been running far longer than it should,
  or a job has not even started a tick for that long (the scheduler stopped). Only a
  restart helps, so this is what withholds the systemd watchdog.
- **Failing** (`JobProgress.failing`, `LagTracker.problems`): ticks complete but fail,
  e.g. one chain's node is down. A restart would not help and would interrupt every
  healthy chain and the API, so this makes the instance unready (/readyz, metrics) and
  logs one alert event when it starts and one when it ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from prometheus_client import Gauge

log = structlog.get_logger(__name__)

CHAIN_LAG = Gauge(
    "escrowd_chain_lag",
    "Blocks (EVM) or slots (Solana) between the chain head and what the poller has scanned; "
    "estimated from the chain's observed block rate while polls fail.",
    ["chain", "unit"],
)
CHAIN_LAG_ESTIMATED = Gauge(
    "escrowd_chain_lag_estimated",
    "1 while escrowd_chain_lag is an estimate (the last polls could not read the head).",
    ["chain"],
)
CHAIN_FAILED_POLLS = Gauge(
    "escrowd_chain_failed_polls",
    "Consecutive failed polls of the chain (0 after a successful one).",
    ["chain"],
)
CHAIN_LAST_POLL = Gauge(
    "escrowd_chain_last_poll_success_timestamp_seconds",
    "Unix time of the chain poller's last successful poll in this instance.",
    ["chain"],
)
JOB_FAILING = Gauge(
    "escrowd_job_consecutive_failures",
    "Consecutive failed ticks of the job (0 after a successful one).",
    ["job"],
)


@dataclass
class _JobState:
    interval_s: float
    last_started: float
    running_since: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    failing_since: float | None = None
    reported_failing: bool = False


@dataclass(frozen=True)
class Failing:
    """A job whose every tick has failed since `since_s` seconds ago."""

    job: str
    since_s: float
    ticks: int
    error: str

    def describe(self) -> str:
        return f"failing for {self.since_s:.0f} s ({self.ticks} ticks): {self.error}"


class JobProgress:
    """When each job last started, finished and failed a tick.

    A tick skipped because another instance holds the lock counts as a success: this
    instance is healthy and the job is being done."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _JobState] = {}

    def register(self, name: str, interval_s: float) -> None:
        with self._lock:
            self._jobs.setdefault(
                name, _JobState(interval_s=interval_s, last_started=self._clock())
            )

    def started(self, name: str) -> None:
        with self._lock:
            state = self._jobs[name]
            state.running_since = state.last_started = self._clock()

    def finished(self, name: str, error: str | None) -> None:
        with self._lock:
            state = self._jobs[name]
            state.running_since = None
            state.last_error = error
            if error is None:
                state.consecutive_failures = 0
                state.failing_since = None
            else:
                state.consecutive_failures += 1
                if state.failing_since is None:
                    state.failing_since = self._clock()
            failures = state.consecutive_failures
        JOB_FAILING.labels(name).set(failures)

    def wedged(self, stale_after_s: float) -> list[str]:
        """Jobs stuck in one tick, or not started at all, for more than `stale_after_s`
        past their interval (a job every 5 minutes is not wedged at 3). Failing ticks do
        not count: they end, and the next one runs."""
        now = self._clock()
        with self._lock:
            return sorted(
                name
                for name, state in self._jobs.items()
                if now - (state.running_since or state.last_started)
                > state.interval_s + stale_after_s
            )

    def failing(self, longer_than_s: float) -> list[Failing]:
        """Jobs whose ticks have all failed for more than `longer_than_s`; logs
        `job_failing` once when a job crosses it and `job_recovered` when it succeeds."""
        now = self._clock()
        found: list[Failing] = []
        recovered: list[str] = []
        with self._lock:
            for name, state in sorted(self._jobs.items()):
                if state.failing_since is None:
                    if state.reported_failing:
                        state.reported_failing = False
                        recovered.append(name)
                    continue
                since_s = now - state.failing_since
                if since_s <= longer_than_s:
                    continue
                failing = Failing(name, since_s, state.consecutive_failures, state.last_error or "")
                found.append(failing)
                if not state.reported_failing:
                    state.reported_failing = True
                    log.error(
                        "job_failing",
                        job=name,
                        failing_s=round(since_s, 1),
                        ticks=failing.ticks,
                        error=failing.error,
                    )
        for name in recovered:
            log.info("job_recovered", job=name)
        return found

    def running(self) -> list[str]:
        with self._lock:
            return sorted(
                name for name, state in self._jobs.items() if state.running_since is not None
            )


@dataclass(frozen=True)
class LagReading:
    """What one poll tick told about its chain. `lag`: blocks/slots behind the head when
    the poll measured it; `head`: the head it read, if any (a poll can fail after reading
    it); `error`: why the tick failed, None when it succeeded."""

    lag: int | None = None
    head: int | None = None
    error: str | None = None

    @classmethod
    def of(cls, outcome: object, lag_attribute: str) -> LagReading:
        """From a poll result or the exception a tick raised: pollers and their errors
        carry `head`, `error` and `lag_blocks` / `lag_slots` attributes where they know
        them."""
        lag = getattr(outcome, lag_attribute, None)
        head = getattr(outcome, "head", None)
        error = getattr(outcome, "error", None)
        if isinstance(outcome, BaseException):
            error = f"{type(outcome).__name__}: {outcome}"
        return cls(
            lag=lag if isinstance(lag, int) else None,
            head=head if isinstance(head, int) else None,
            error=None if error is None else str(error),
        )


@dataclass
class _Poller:
    unit: str
    max_lag: int
    registered_at: float
    lag: int | None = None
    estimated: bool = False
    head: int | None = None
    head_at: float | None = None
    # Blocks or slots per second, from successive heads; estimates the lag while failing.
    rate: float | None = None
    # head - lag at the last measured poll: where the poller had scanned to.
    position: int | None = None
    last_success: float | None = None
    failures: int = 0
    error: str | None = None
    elsewhere: bool = False
    unready: str | None = None


class LagTracker:
    """Each chain poller's lag and failures, judged against the thresholds.

    A poller is unready when its lag exceeds its `max_lag`, after `max_failed_polls`
    failed polls in a row, or when its last successful poll is older than
    `max_silence_s` (a poll that hangs records nothing). One failed poll is not enough:
    providers throttle and time out now and then."""

    def __init__(
        self,
        *,
        max_failed_polls: int = 5,
        max_silence_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert max_failed_polls >= 1 and max_silence_s > 0
        self.max_failed_polls = max_failed_polls
        self.max_silence_s = max_silence_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pollers: dict[str, _Poller] = {}

    def expect(self, chain: str, unit: str, max_lag: int) -> None:
        with self._lock:
            self._pollers.setdefault(
                chain, _Poller(unit=unit, max_lag=max_lag, registered_at=self._clock())
            )

    def record(self, chain: str, reading: LagReading) -> None:
        now = self._clock()
        with self._lock:
            entry = self._pollers[chain]
            entry.elsewhere = False
            if reading.head is not None:
                if entry.head is not None and entry.head_at is not None and now > entry.head_at:
                    observed = max(0, reading.head - entry.head) / (now - entry.head_at)
                    entry.rate = (
                        observed if entry.rate is None else 0.7 * entry.rate + 0.3 * observed
                    )
                entry.head, entry.head_at = reading.head, now
            if reading.lag is not None:
                entry.lag, entry.estimated = reading.lag, False
                entry.position = None if reading.head is None else reading.head - reading.lag
            elif entry.position is not None:
                # The poll did not measure its lag; the scanned position has not moved
                # since it last did, the head has: as read now, or at the observed rate.
                head: int | None = reading.head
                rate, last_head, head_at = entry.rate, entry.head, entry.head_at
                if (
                    head is None
                    and rate is not None
                    and last_head is not None
                    and head_at is not None
                ):
                    head = last_head + int(rate * (now - head_at))
                if head is not None:
                    entry.lag, entry.estimated = max(0, head - entry.position), True
            if reading.error is None:
                entry.failures, entry.error, entry.last_success = 0, None, now
            else:
                entry.failures += 1
                entry.error = reading.error
            lag, estimated, failures, unit = entry.lag, entry.estimated, entry.failures, entry.unit
        if lag is not None:
            CHAIN_LAG.labels(chain, unit).set(lag)
        CHAIN_LAG_ESTIMATED.labels(chain).set(1 if estimated else 0)
        CHAIN_FAILED_POLLS.labels(chain).set(failures)
        if reading.error is None:
            CHAIN_LAST_POLL.labels(chain).set_to_current_time()

    def polled_elsewhere(self, chain: str) -> None:
        """Another instance holds this poller; its lag is that instance's to report."""
        with self._lock:
            self._pollers[chain].elsewhere = True

    def _problem(self, entry: _Poller, now: float) -> str | None:
        if entry.elsewhere:
            return None
        silent_s = now - (entry.last_success or entry.registered_at)
        lag = "" if entry.lag is None else f"; {entry.lag} {entry.unit} behind head"
        if entry.lag is not None and entry.estimated:
            lag += " (estimated)"
        if entry.failures >= self.max_failed_polls:
            return f"{entry.failures} failed polls in a row{lag}; last error: {entry.error}"
        if silent_s > self.max_silence_s:
            what = "no successful poll" if entry.last_success is not None else "no poll yet"
            return f"{what} for {silent_s:.0f} s{lag}"
        if entry.last_success is None:
            return "no completed poll yet" + (f"; last error: {entry.error}" if entry.error else "")
        if entry.lag is not None and entry.lag > entry.max_lag:
            return f"{entry.lag} {entry.unit} behind head (threshold {entry.max_lag})"
        return None

    def problems(self) -> dict[str, str]:
        """chain -> why it is not ready; empty when every poller is healthy. Logs
        `chain_unavailable` once when a chain crosses a threshold (a fresh poller that has
        not succeeded yet is unready without one) and `chain_available` when it recovers."""
        now = self._clock()
        found: dict[str, str] = {}
        events: list[tuple[str, str, str | None]] = []
        with self._lock:
            for chain, entry in self._pollers.items():
                problem = self._problem(entry, now)
                # Before its first success a poller is unready, but not yet an outage.
                starting = (
                    entry.last_success is None
                    and entry.failures < self.max_failed_polls
                    and now - entry.registered_at <= self.max_silence_s
                )
                if problem is not None:
                    found[chain] = problem
                    if entry.unready is None and not starting:
                        events.append(("chain_unavailable", chain, problem))
                elif entry.unready is not None:
                    events.append(("chain_available", chain, None))
                entry.unready = None if starting else problem
        for event, chain, problem in events:
            if problem is None:
                log.info(event, chain=chain)
            else:
                log.error(event, chain=chain, reason=problem)
        return found
