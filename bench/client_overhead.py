"""escrowd.client's cost per call against raw httpx on the same endpoints.

Usage: python -m bench.client_overhead [--calls 1000] [--record]

A real uvicorn API server in a process of its own on a SQLite database (as the daemon runs
beside a marketplace backend), one client thread in this process. Two operations:
GET /v1/agents/{id} and POST /v1/escrows (fund, a fresh job each call). The baseline is a
keep-alive httpx.Client sending the same request with the same headers (API key, a fresh
uuid4 Idempotency-Key on the POST) and decoding the JSON answer; the client sends it
through `EscrowdClient` (Call, retry bookkeeping, error mapping, reading the answer into a
frozen value). The two run as pairs of calls back to back, so the drift of a shared
machine hits both alike. Reported per call: wall time (what the caller waits for, the
server included) and the calling thread's CPU time (the client's own cost), as medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.escrow import _free_port, _serve, _setup, _wait_until_serving
from escrowd.client import EscrowdClient
from escrowd.config.rate_limit import MAX_REQUESTS, RateLimit
from escrowd.daemon.logs import configure_logging
from escrowd.escrow import apikeys
from escrowd.models import ApiScope
from escrowd.models.db import make_engine

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# The bench key's own limit, far above any rate here: counted, never refused.
BENCH_LIMIT = RateLimit(requests=MAX_REQUESTS, window_s=1)
BUYER, WORKER = "buyer-0", "worker-0"

Operation = Callable[[int], None]


def _one(operation: Operation, i: int) -> tuple[float, float]:
    """One call's wall and CPU microseconds."""
    wall, cpu = time.perf_counter(), time.thread_time()
    operation(i)
    return (time.perf_counter() - wall) * 1e6, (time.thread_time() - cpu) * 1e6


def _paired(
    raw: Operation, client: Operation, calls: int
) -> list[tuple[float, float, float, float]]:
    """`calls` pairs of calls, raw and client back to back (the order alternating), so a
    burst of load on the shared machine hits both sides of a pair alike. Per pair: raw
    wall, client wall, raw CPU, client CPU (microseconds)."""
    pairs = []
    for i in range(calls):
        if i % 2 == 0:
            raw_wall, raw_cpu = _one(raw, i)
            client_wall, client_cpu = _one(client, i)
        else:
            client_wall, client_cpu = _one(client, i)
            raw_wall, raw_cpu = _one(raw, i)
        pairs.append((raw_wall, client_wall, raw_cpu, client_cpu))
    return pairs


def _operations(url: str, key: str) -> dict[str, tuple[Operation, Operation]]:
    """Per endpoint: (raw httpx, escrowd.client) doing the same request."""
    raw = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    client = EscrowdClient(url, key)
    run = uuid.uuid4().hex[:8]

    def raw_get(_: int) -> None:
        answer = raw.get(f"/v1/agents/{BUYER}")
        assert answer.status_code == 200, answer.text
        answer.json()

    def client_get(_: int) -> None:
        client.get_agent(BUYER)

    def fund_body(tag: str, i: int) -> dict[str, object]:
        return {
            "job_id": f"{tag}-{run}-{i}-{uuid.uuid4().hex[:6]}",
            "buyer": BUYER,
            "worker": WORKER,
            "asset": "USDC",
            "amount": "1",
        }

    def raw_fund(i: int) -> None:
        answer = raw.post(
            "/v1/escrows",
            json=fund_body("raw", i),
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert answer.status_code == 201, answer.text
        answer.json()

    def client_fund(i: int) -> None:
        client.fund_escrow(**fund_body("client", i))  # type: ignore[arg-type]

    return {
        "GET /v1/agents/{id}": (raw_get, client_get),
        "POST /v1/escrows": (raw_fund, client_fund),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1000, help="pairs of calls per endpoint")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    configure_logging(level="warning")
    data_dir = Path(tempfile.mkdtemp(prefix="escrowd-bench-client-"))
    db_url = f"sqlite:///{data_dir / 'escrowd.db'}"
    engine = make_engine(db_url)
    sessions = _setup(engine, 1)
    with sessions() as s, s.begin():
        _, key = apikeys.create_key(s, name="bench", scope=ApiScope.WRITE, rate_limit=BENCH_LIMIT)
    engine.dispose()
    port = _free_port()
    server = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(db_url, port, data_dir), daemon=True
    )
    server.start()
    try:
        _wait_until_serving(port, server)
        operations = _operations(f"http://127.0.0.1:{port}", key)
        figures = {}
        for name, (raw, client) in operations.items():
            raw(0), client(0)  # warm: connections open, code paths loaded
            figures[name] = _paired(raw, client, args.calls)
    finally:
        server.terminate()
        server.join(timeout=10)

    rows = []
    for name, pairs in figures.items():
        raw_wall, client_wall, raw_cpu, client_cpu = (
            statistics.median(pair[k] for pair in pairs) for k in range(4)
        )
        added_wall = statistics.median(c - r for r, c, _, _ in pairs)
        added_cpu = statistics.median(c - r for _, _, r, c in pairs)
        rows.append((name, raw_wall, client_wall, added_wall, raw_cpu, client_cpu, added_cpu))
        print(
            f"{name}: wall raw {raw_wall:6.0f} us, client {client_wall:6.0f} us, added "
            f"{added_wall:+5.0f} us; client CPU raw {raw_cpu:4.0f} us, client "
            f"{client_cpu:4.0f} us, added {added_cpu:+4.0f} us (medians of {len(pairs)} pairs)"
        )
    if args.record:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
        lines = [
            "",
            "## escrowd.client overhead per call against raw httpx (bench/client_overhead.py)",
            "",
            f"Machine: 2-core python-svc ({platform.machine()}), {when} UTC, shared with other "
            "streams' test runs. uvicorn API server in its own process on SQLite, one client "
            f"thread; {args.calls} pairs of calls per endpoint, raw and client back to back "
            "(order alternating); medians per call in microseconds, 'added' = median of the "
            "pairs' differences.",
            "",
            "| endpoint | raw httpx wall | client wall | added wall | raw CPU | client CPU "
            "| added CPU |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {name} | {rw:.0f} | {cw:.0f} | {aw:+.0f} | {rc:.0f} | {cc:.0f} | {ac:+.0f} |"
                for name, rw, cw, aw, rc, cc, ac in rows
            ),
        ]
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
