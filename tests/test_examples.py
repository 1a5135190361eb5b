"""The example backends in examples/, run as their authors would run them.

Each is loaded from its own folder with its own top-level `app`, `models` and `config`
modules first on sys.path (as a Flask or FastAPI app's are), beside escrowd's packages.
The Flask one funds and releases escrows in process; the FastAPI one calls a running
`escrowd dev` API with the async client and receives its signed webhooks over HTTP.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import Session

from escrowd.client import EscrowdClient
from escrowd.escrow import EscrowService, service
from escrowd.escrow.events import API_VERSION
from escrowd.escrow.webhooks import signature_header
from escrowd.models.db import make_engine
from tests.dev_api import LAMPORTS_PER_SOL, DevApi, running_dev_api, wait_for
from tests.escrow_fixtures import credit, seed_asset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OWN_MODULES = ("app", "config", "models")
USDC = 10**6


@contextlib.contextmanager
def example(folder: str, env: dict[str, str]) -> Iterator[ModuleType]:
    """The example's `app` module, imported with its settings in the environment."""
    path = EXAMPLES / folder
    assert not set(OWN_MODULES) & set(sys.modules)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    sys.path.insert(0, str(path))
    try:
        app = importlib.import_module("app")
        for name in OWN_MODULES:  # its own modules, not escrowd's of the same name
            assert Path(sys.modules[name].__file__ or "").parent == path, name
        yield app
    finally:
        sys.path.remove(str(path))
        for name in OWN_MODULES:
            sys.modules.pop(name, None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- Flask, in process --------------------------------------------------------------------


def test_flask_example_funds_and_releases_in_process(sqlite_url: str, tmp_path: Path) -> None:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'marketplace.db'}",
        "ESCROWD_DATABASE_URL": sqlite_url,
    }
    with example("flask_marketplace", env) as app:
        web = app.create_app().test_client()
        for agent in ("buyer", "worker"):
            assert web.post("/agents", json={"agent_id": agent, "name": agent}).status_code == 201
        escrowd = make_engine(sqlite_url)
        with Session(escrowd) as s, s.begin():  # as a confirmed 100 USDC deposit would
            seed_asset(s)
            credit(s, service.get_agent(s, "buyer").id, 100 * USDC)
        job = {"title": "Summarise", "price": "12.5", "buyer_id": "buyer", "worker_id": "worker"}
        task_id = web.post("/jobs", json=job).get_json()["task_id"]

        funded = web.post(f"/jobs/{task_id}/fund")
        assert funded.status_code == 200 and funded.get_json()["status"] == "funded"
        assert web.get("/agents/buyer/balance").get_json() == {"USDC": 87_500_000}
        accepted = web.post(f"/jobs/{task_id}/accept").get_json()

        # 12.5 USDC minus the 2.5 % platform fee.
        assert accepted == {"task_id": task_id, "status": "resolved", "paid": 12_187_500}
        assert web.get("/agents/worker/balance").get_json() == {"USDC": 12_187_500}
        again = web.post(f"/jobs/{task_id}/fund")
        assert (again.status_code, again.get_json()["error"]) == (409, "escrow_conflict")
        big = web.post("/jobs", json={**job, "price": "1000"}).get_json()["task_id"]
        short = web.post(f"/jobs/{big}/fund")
        assert (short.status_code, short.get_json()["error"]) == (422, "insufficient_funds")
        too_fine = web.post("/jobs", json={**job, "price": "0.0000001"})
        assert too_fine.status_code == 400
        assert web.post("/jobs/no-such-task/fund").status_code == 404
        assert web.get("/agents/buyer/balance").get_json() == {"USDC": 87_500_000}
        escrowd.dispose()
    library = EscrowService.from_url(sqlite_url)
    assert library.get_escrow(task_id).status == "released"
    assert library.get_escrow(task_id).buyer == "buyer"
    library.close()


# --- FastAPI, over HTTP with webhooks -----------------------------------------------------


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevApi]:
    with running_dev_api(tmp_path_factory.mktemp("examples") / "dev") as api:
        yield api


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def serving(asgi_app: object, port: int) -> Iterator[str]:
    server = uvicorn.Server(
        uvicorn.Config(asgi_app, host="127.0.0.1", port=port, log_level="warning")  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for("the example to serve", lambda: server.started, timeout_s=20)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_fastapi_example_uses_the_async_client_and_verified_webhooks(
    dev: DevApi, tmp_path: Path
) -> None:
    port = _free_port()
    admin = EscrowdClient(dev.url, dev.api_key)
    hook = admin.create_webhook_endpoint(f"http://127.0.0.1:{port}/webhooks/escrowd")
    assert hook.secret is not None
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'marketplace.db'}",
        "ESCROWD_URL": dev.url,
        "ESCROWD_API_KEY": dev.api_key,
        "ESCROWD_WEBHOOK_SECRET": hook.secret,
        "ESCROW_ASSET": "SOL",
    }
    with example("fastapi_marketplace", env) as app, serving(app.app, port) as url:
        web = httpx.Client(base_url=url, timeout=30)
        client = web.post("/agents", json={"agent_id": "client-1", "display_name": "C"}).json()
        web.post("/agents", json={"agent_id": "seller-1", "display_name": "S"})
        dev.airdrop(client["deposit_address"], 2 * LAMPORTS_PER_SOL)
        wait_for(
            "the deposit to be credited",
            lambda: (
                [b.available_base_units for b in admin.balances("client-1")]
                == [2 * LAMPORTS_PER_SOL]
            ),
        )

        job = {"client_id": "client-1", "seller_id": "seller-1", "price": "1.5"}
        job_id = web.post("/jobs", json=job).json()["job_id"]

        def status() -> object:
            return web.get(f"/jobs/{job_id}").json()

        wait_for("escrow.funded delivered", lambda: status()["status"] == "funded")  # type: ignore[index]
        assert web.post(f"/jobs/{job_id}/complete").status_code == 202
        wait_for("escrow.released delivered", lambda: status()["status"] == "completed")  # type: ignore[index]
        # 1.5 SOL minus the 2.5 % platform fee, as the signed event reported it.
        assert status() == {"job_id": job_id, "status": "completed", "seller_paid": 1_462_500_000}

        short = web.post("/jobs", json={**job, "price": "100"})
        assert (short.status_code, short.json()["error"]) == (422, "insufficient_funds")

        # A forged event is refused; a replay of a delivered event id changes nothing.
        forged = json.dumps(
            {"type": "escrow.refunded", "api_version": API_VERSION, "data": {"job_id": job_id}}
        ).encode()
        bad = web.post(
            "/webhooks/escrowd",
            content=forged,
            headers={"Escrowd-Signature": f"t={int(time.time())},v1=00", "Escrowd-Event-Id": "x"},
        )
        assert bad.status_code == 400
        delivered = [d.event_id for d in admin.iter_webhook_deliveries(endpoint_id=hook.id)]
        replay = json.dumps(
            {
                "type": "escrow.refunded",
                "api_version": API_VERSION,
                "data": {
                    "job_id": job_id,
                    "status": "refunded",
                    "buyer": "client-1",
                    "worker": "seller-1",
                    "asset": "SOL",
                    "amount_base_units": "1500000000",
                    "fee_bps": 250,
                },
            }
        ).encode()
        replayed = web.post(
            "/webhooks/escrowd",
            content=replay,
            headers={
                "Escrowd-Signature": signature_header(replay, hook.secret, int(time.time())),
                "Escrowd-Event-Id": str(max(delivered)),
            },
        )
        assert replayed.status_code == 204
        assert status()["status"] == "completed"  # type: ignore[index]
        web.close()
    admin.delete_webhook_endpoint(hook.id)
    admin.close()
