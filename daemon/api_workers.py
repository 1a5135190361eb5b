"""The HTTP API served by N forked processes sharing one listening socket.

One interpreter serves one request at a time between its database calls (the GIL), so the
API scales across cores only with processes. The supervisor binds the socket, forks the
workers before it starts any thread (a fork copies only the calling thread, so a lock held
by another one would stay locked in the child), and the kernel hands each new connection
to whichever worker accepts first. Each worker runs uvicorn on uvloop and httptools,
builds its own app and its own connections (the parent's pool is disposed of before the
fork, so no database socket is shared), and sets an event once it accepts connections.

SIGTERM to a worker is uvicorn's graceful shutdown: stop accepting, finish the requests in
flight, close keep-alive connections, exit 0. A worker whose supervisor was killed outright
(SIGKILL, the OOM killer) shuts itself down the same way within a second.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

import structlog
import uvicorn
from fastapi import FastAPI

from escrowd.config.errors import Unavailable

log = structlog.get_logger(__name__)

# Connections the kernel queues before a worker accepts them: wrk and a busy backend open
# many at once.
LISTEN_BACKLOG = 2048


class ApiStartFailed(Unavailable):
    type = "api_start_failed"


def default_worker_count() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ApiStartFailed(
            f"the HTTP API cannot listen on {host}:{port}: {exc.strerror} (is the port in use?)"
        ) from exc
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


# How often a worker checks that its supervisor is still there.
PARENT_CHECK_S = 1.0


class _ReadyServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: Event) -> None:
        super().__init__(config)
        self._ready = ready
        self._parent = os.getppid()
        self._watch: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._watch = asyncio.create_task(self._watch_parent())
        self._ready.set()

    async def _watch_parent(self) -> None:
        """Shut down gracefully when the supervisor is gone (killed outright, it could not
        stop us): an orphaned worker would keep the port and serve with no one watching."""
        while not self.should_exit:
            await asyncio.sleep(PARENT_CHECK_S)
            if os.getppid() != self._parent:
                log.warning("api_worker_orphaned", pid=os.getpid(), supervisor=self._parent)
                self.should_exit = True


def uvicorn_config(app: FastAPI, *, graceful_timeout_s: float) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=max(1, int(graceful_timeout_s)),
    )


def _serve(
    build_app: Callable[[], FastAPI], sock: socket.socket, ready: Event, graceful_timeout_s: float
) -> None:
    # The supervisor's handlers came along with the fork; uvicorn installs its own while it
    # serves and re-raises the signal after shutdown, which must then do nothing here.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = uvicorn_config(build_app(), graceful_timeout_s=graceful_timeout_s)
    # What start-up built lives as long as the process: out of the collector's way, a full
    # collection no longer walks it (tens of milliseconds that stalled every request in
    # flight) and forked pages stay shared.
    gc.collect()
    gc.freeze()
    _ReadyServer(config, ready).run(sockets=[sock])


class ApiWorkerPool:
    """Fork `count` API processes on one socket; wait until each accepts; stop them all."""

    def __init__(
        self,
        build_app: Callable[[], FastAPI],
        *,
        host: str,
        port: int,
        count: int,
        graceful_timeout_s: float,
    ) -> None:
        assert count >= 1, "the caller resolves 0 (one per core) before"
        self.build_app = build_app
        self.host = host
        self.count = count
        self.graceful_timeout_s = graceful_timeout_s
        self.socket = bind_socket(host, port)
        self.port = int(self.socket.getsockname()[1])
        self.processes: list[BaseProcess] = []

    def start(self, timeout_s: float) -> None:
        context = multiprocessing.get_context("fork")
        readies = []
        for index in range(self.count):
            ready = context.Event()
            process = context.Process(
                target=_serve,
                args=(self.build_app, self.socket, ready, self.graceful_timeout_s),
                name=f"escrowd-api-{index}",
                daemon=False,
            )
            process.start()
            self.processes.append(process)
            readies.append(ready)
        deadline = time.monotonic() + timeout_s
        for started, ready in zip(self.processes, readies, strict=True):
            while not ready.wait(0.05):
                if not started.is_alive() or time.monotonic() > deadline:
                    raise ApiStartFailed(
                        f"API worker {started.name} did not start on {self.host}:{self.port}"
                        f" (exit code {started.exitcode}; see the log above)"
                    )
        log.info("api_workers_started", workers=self.count, pids=self.pids())

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes if process.pid is not None]

    def exited(self) -> list[str]:
        return [process.name for process in self.processes if not process.is_alive()]

    def terminate(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def join(self, deadline: float) -> list[str]:
        """Wait for the workers until `deadline` (monotonic); the names of those still
        running then, which are killed."""
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        stuck = [process.name for process in self.processes if process.is_alive()]
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        self.socket.close()
        return stuck
