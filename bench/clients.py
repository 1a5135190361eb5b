"""Concurrent benchmark clients spread over processes, the way a deployment scales.

escrowd's API and workers are stateless, so more cores are used by more processes; threads
of one Python process share one interpreter lock. `spread` starts `processes` spawned
processes, each running `clients / processes` client threads from a module-level function,
starts them together and returns the operations completed and the client CPU seconds.
On this 2-core machine one process per core did best for 16 clients (ledger postings/s,
runs within a few minutes of each other: 1 process 1,330, 2 processes 1,515 and 1,785,
4 processes 1,308, 8 processes 1,382, 16 processes 1,116): one process is bound by its
interpreter lock, many by switching between them.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol


class ClientGroup(Protocol):
    """One process's share: run clients first..first+count-1 until `seconds` after `ready()`
    returns, and return how many operations they completed."""

    def __call__(
        self, config: Any, first: int, count: int, seconds: float, ready: Callable[[], None]
    ) -> int: ...


def run_threads(
    count: int,
    seconds: float,
    ready: Callable[[], None],
    client: Callable[[int, Callable[[], bool]], int],
) -> int:
    """`count` threads each running `client(slot, running)`, which works while `running()`
    and returns its operations; the clock starts once every thread and `ready()` are set.
    The first client's exception, if any, is raised once all have stopped."""
    done = [0] * count
    failures: list[BaseException] = []
    deadline = [0.0]
    started = threading.Barrier(count + 1)

    def running() -> bool:
        return time.monotonic() < deadline[0]

    def body(slot: int) -> None:
        started.wait()
        try:
            done[slot] = client(slot, running)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=body, args=(slot,)) for slot in range(count)]
    for thread in threads:
        thread.start()
    ready()
    deadline[0] = time.monotonic() + seconds
    started.wait()
    for thread in threads:
        thread.join()
    if failures:
        # A client that stopped early would make the figure quietly wrong.
        raise failures[0]
    return sum(done)


def _process(
    group: ClientGroup,
    config: Any,
    first: int,
    count: int,
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    cpu_started = [0.0]

    def ready() -> None:
        barrier.wait(timeout=300)
        cpu_started[0] = time.process_time()

    try:
        done = group(config, first, count, seconds, ready)
    except Exception as exc:
        # The parent re-raises it instead of waiting for a result that never comes.
        results.put(RuntimeError(f"client process {first // count}: {exc!r}"))
        raise
    results.put((done, time.process_time() - cpu_started[0]))


def spread(
    group: ClientGroup, config: Any, *, clients: int, processes: int, seconds: float
) -> tuple[float, float]:
    """Operations per second over the run and client CPU milliseconds per operation
    (all processes, from the start signal on)."""
    assert processes >= 1 and clients % processes == 0, "clients must divide over processes"
    per = clients // processes
    ctx = multiprocessing.get_context("spawn")
    # The parent waits at the barrier too, so the clock starts when every client is ready.
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [
        ctx.Process(target=_process, args=(group, config, p * per, per, seconds, barrier, results))
        for p in range(processes)
    ]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=300)
    started = time.monotonic()
    outcomes = [results.get(timeout=seconds + 300) for _ in workers]
    elapsed = time.monotonic() - started
    for worker in workers:
        worker.join()
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    done = sum(n for n, _ in outcomes)
    cpu_s = sum(c for _, c in outcomes)
    return done / elapsed, 1e3 * cpu_s / max(done, 1)
