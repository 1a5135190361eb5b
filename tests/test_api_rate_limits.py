"""Rate limits per API key: 429 with Retry-After and RateLimit-* headers, windows that
reset, the default and per-key limits (CLI), revoked and forged keys, audit rows,
the metric, the limit held exactly by two `escrowd run` processes on one PostgreSQL, and
high limits counted in claims a process hands out itself (never past the limit)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from escrowd.config.rate_limit import RateLimit
from escrowd.config.settings import ApiSettings, SettingsError, load_settings
from escrowd.daemon.api import create_app
from escrowd.escrow import apikeys, audit, ratelimit
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import ApiRateWindow, ApiScope, AuditLog
from escrowd.models.db import make_session_factory, statement_rows
from tests.daemon_support import DaemonProcess, daemon_env
from tests.escrow_fixtures import apikey_cli, make_settings


def _client(engine: Engine, data_dir: Path, default: str = "6000/60s") -> TestClient:
    settings = make_settings(data_dir).model_copy(update={"api": ApiSettings(rate_limit=default)})
    app = create_app(settings, engine, webhook_cipher=SecretCipher(bytes(range(32))))
    return TestClient(app, raise_server_exceptions=False)


def _key(
    sessions: sessionmaker[Session],
    scope: ApiScope = ApiScope.READ,
    limit: RateLimit | None = None,
) -> str:
    with sessions() as s, s.begin():
        _, key = apikeys.create_key(s, name="rl", scope=scope, rate_limit=limit)
    return key


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _prefix(key: str) -> str:
    return key.split("_")[1]


def _fresh_window(window_s: int, need_s: float) -> None:
    """Wait for the next window when fewer than `need_s` seconds are left in this one, so
    a test's requests fall in one window (windows start at multiples of their length)."""
    left = window_s - time.time() % window_s
    if left < need_s:
        time.sleep(left + 0.05)


def _actions(sessions: sessionmaker[Session], prefix: str) -> list[str]:
    with sessions() as s:
        rows = s.scalars(
            select(AuditLog.action)
            .where(AuditLog.stream == f"api_key:{prefix}")
            .order_by(AuditLog.seq)
        )
        return list(rows)


def test_limit_answers_429_with_retry_after_and_resets_with_the_window(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    client = _client(engine, tmp_path)
    key = _key(sessions, limit=RateLimit(requests=3, window_s=3))
    _fresh_window(3, 2.5)
    answers = [client.get("/v1/networks", headers=_auth(key)) for _ in range(5)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert [a.headers["RateLimit-Limit"] for a in answers] == ["3"] * 5
    assert [a.headers["RateLimit-Remaining"] for a in answers] == ["2", "1", "0", "0", "0"]
    assert all(1 <= int(a.headers["RateLimit-Reset"]) <= 3 for a in answers)
    refused = answers[3]
    assert refused.json()["error"]["type"] == "rate_limited"
    assert _prefix(key) in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"] == refused.headers["RateLimit-Reset"]
    assert "Retry-After" not in answers[0].headers

    time.sleep(int(refused.headers["Retry-After"]))
    again = client.get("/v1/networks", headers=_auth(key))
    assert again.status_code == 200
    assert again.headers["RateLimit-Remaining"] == "2"


def test_default_limit_per_key_limits_and_the_cli(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    client = _client(engine, tmp_path, default="2/60s")
    app = apikey_cli(engine)
    runner = CliRunner()
    made = runner.invoke(
        app, ["apikey", "create", "--name", "m", "--scope", "read", "--rate-limit", "4/1m"]
    )
    assert made.exit_code == 0, made.output
    [own] = [line for line in made.stdout.splitlines() if line.startswith("esk_")]
    default = _key(sessions)
    listed = {
        row["prefix"]: row["rate_limit"]
        for row in map(
            json.loads, runner.invoke(app, ["apikey", "list", "--json"]).stdout.splitlines()
        )
    }
    assert listed == {_prefix(own): "4/60s", _prefix(default): "default"}

    _fresh_window(60, 10)
    codes = [client.get("/v1/networks", headers=_auth(default)).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    codes = [client.get("/v1/networks", headers=_auth(own)).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 200, 429]

    # A higher limit applies from the next request; "default" takes the key back to 2.
    raised = runner.invoke(app, ["apikey", "set-limit", _prefix(default), "10/60s"])
    assert raised.exit_code == 0, raised.output
    answer = client.get("/v1/networks", headers=_auth(default))
    assert (answer.status_code, answer.headers["RateLimit-Remaining"]) == (200, "6")
    assert runner.invoke(app, ["apikey", "set-limit", _prefix(default), "default"]).exit_code == 0
    assert client.get("/v1/networks", headers=_auth(default)).status_code == 429

    for bad in ("0/60s", "10", "10/0s", "10/2d", "ten/60s"):
        refused = runner.invoke(app, ["apikey", "set-limit", _prefix(own), bad])
        assert refused.exit_code == 1
        assert "invalid rate limit" in refused.output
    unknown = runner.invoke(app, ["apikey", "set-limit", "000000000000", "5/60s"])
    assert unknown.exit_code == 1
    assert _actions(sessions, _prefix(default)) == [
        "api_key_created",
        "rate_limit_exceeded",
        "api_key_rate_limit_set",
        "api_key_rate_limit_set",
    ]


def test_forged_and_revoked_keys_count_nothing_and_every_authenticated_answer_has_headers(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    client = _client(engine, tmp_path)
    key = _key(sessions, limit=RateLimit(requests=5, window_s=3600))
    _fresh_window(3600, 10)
    forged = f"esk_{_prefix(key)}_{'A' * 43}"
    for _ in range(10):
        answer = client.get("/v1/networks", headers=_auth(forged))
        assert answer.status_code == 401
        assert "RateLimit-Limit" not in answer.headers
    # A route the key's scope does not allow still answers with its quota, and counts.
    forbidden = client.get("/v1/webhook-endpoints", headers=_auth(key))
    assert forbidden.status_code == 403
    assert forbidden.headers["RateLimit-Remaining"] == "4"
    missing = client.get("/v1/agents/nobody", headers=_auth(key))
    assert (missing.status_code, missing.headers["RateLimit-Remaining"]) == (404, "3")

    with sessions() as s, s.begin():
        apikeys.revoke_key(s, _prefix(key))
    revoked = client.get("/v1/networks", headers=_auth(key))
    assert revoked.status_code == 401
    assert "RateLimit-Limit" not in revoked.headers
    assert _actions(sessions, _prefix(key)) == ["api_key_created", "api_key_revoked"]


def test_claims_in_sql_follow_the_rule_in_python(pg_engine: Engine) -> None:
    # PG_ADMIT (PostgreSQL) and `claimed` (SQLite) must grant alike, for limits with a lease
    # of one request and with leases up to LEASE_MAX.
    sessions = make_session_factory(pg_engine)
    _fresh_window(3600, 30)
    for limit in (1, 7, 60, 127, 128, 1000, 6400, 1_000_000):
        key = _key(sessions, limit=RateLimit(requests=limit, window_s=3600))
        prefix, candidate = apikeys.parse(key)
        seen, expected = [], []
        stored: tuple[int, int] | None = None
        for _ in range(40):
            [row] = statement_rows(pg_engine, ratelimit.PG_ADMIT, (1, 1, prefix, candidate))
            seen.append((row[9], row[10]))
            start, count, granted = ratelimit.claimed(limit, stored, row[8])
            expected.append((count, granted))
            stored = (start, count)
        assert seen == expected, limit
        assert max(granted for _, granted in seen) == min(
            ratelimit.lease_size(limit), max(1, limit // 8)
        )
        assert all(count <= limit for count, granted in seen if granted > 0)


def test_a_process_hands_out_a_high_limits_claims_and_still_holds_revocation_and_changes(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    client = _client(engine, tmp_path)
    key = _key(sessions, limit=RateLimit(requests=6400, window_s=3600))
    prefix = _prefix(key)
    _fresh_window(3600, 30)
    answers = [client.get("/v1/networks", headers=_auth(key)) for _ in range(150)]
    assert {a.status_code for a in answers} == {200}
    remaining = [int(a.headers["RateLimit-Remaining"]) for a in answers]
    assert remaining == list(range(6399, 6249, -1))
    # 150 requests, two claims of the lease size (100) written to the key's window.
    with sessions() as s:
        assert s.scalar(select(ApiRateWindow.request_count)) == 200

    # A lower limit holds from the next request, though this process holds requests of
    # the window it claimed under the old one.
    with sessions() as s, s.begin():
        apikeys.set_rate_limit(s, prefix, RateLimit(requests=100, window_s=3600))
    lowered = client.get("/v1/networks", headers=_auth(key))
    assert (lowered.status_code, lowered.headers["RateLimit-Limit"]) == (429, "100")
    with sessions() as s, s.begin():
        apikeys.set_rate_limit(s, prefix, RateLimit(requests=6400, window_s=3600))
    assert client.get("/v1/networks", headers=_auth(key)).status_code == 200
    # A forged secret cannot take the held requests; revocation holds at once.
    forged = f"esk_{prefix}_{'A' * 43}"
    assert client.get("/v1/networks", headers=_auth(forged)).status_code == 401
    with sessions() as s, s.begin():
        apikeys.revoke_key(s, prefix)
    assert client.get("/v1/networks", headers=_auth(key)).status_code == 401


def test_a_flood_writes_one_audit_row_per_window_and_counts_every_refusal(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    client = _client(engine, tmp_path)
    key = _key(sessions, limit=RateLimit(requests=2, window_s=3600))
    prefix = _prefix(key)
    _fresh_window(3600, 10)
    codes = Counter(client.get("/v1/networks", headers=_auth(key)).status_code for _ in range(12))
    assert codes == {200: 2, 429: 10}
    metric = REGISTRY.get_sample_value("escrowd_api_rate_limited_total", {"key": prefix})
    assert metric == 10
    assert _actions(sessions, prefix) == ["api_key_created", "rate_limit_exceeded"]
    with sessions() as s:
        row = s.scalars(select(AuditLog).where(AuditLog.action == "rate_limit_exceeded")).one()
        assert json.loads(row.details)["limit"] == 2
        assert audit.verify(s).ok
    assert key.split("_", 2)[2] not in row.details


def test_settings_refuse_a_bad_default() -> None:
    with pytest.raises(SettingsError, match=r"api\.rate_limit"):
        load_settings(None, {"ESCROWD_API__RATE_LIMIT": "100 per minute"})
    assert load_settings(None, {}).api.rate_limit == "6000/60s"


def test_openapi_documents_429_and_the_headers(engine: Engine, tmp_path: Path) -> None:
    document = _client(engine, tmp_path).get("/openapi.json").json()
    operation = document["paths"]["/v1/networks"]["get"]
    assert operation["responses"]["429"]["headers"]["Retry-After"]
    for status in ("200", "401", "429"):
        assert {"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= set(
            operation["responses"][status]["headers"]
        )


def _sixteen_clients(ports: list[int], key: str, each: int) -> Counter[int]:
    """The answers' status codes when 16 clients, half on each port, send `each` requests."""
    codes: Counter[int] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(16)

    def client(n: int) -> None:
        url = f"http://127.0.0.1:{ports[n % 2]}/v1/networks"
        with httpx.Client(headers=_auth(key), timeout=30) as http:
            start.wait()
            seen = [http.get(url).status_code for _ in range(each)]
        with lock:
            codes.update(seen)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


@pytest.mark.postgres
def test_two_daemons_share_one_limit_under_16_clients(
    tmp_path: Path, pg_url: str, pg_engine: Engine
) -> None:
    sessions = make_session_factory(pg_engine)
    key = _key(sessions, limit=RateLimit(requests=60, window_s=3600))
    daemons = [
        DaemonProcess(["run"], daemon_env(tmp_path / name, pg_url), tmp_path / f"{name}.log")
        for name in ("a", "b")
    ]
    try:
        ports = [daemon.wait_for("daemon_ready")["api_port"] for daemon in daemons]
        _fresh_window(3600, 60)
        # Every request counted in the database (the lease of a limit under 128 is one).
        codes = _sixteen_clients(ports, key, 8)
        assert codes == {200: 60, 429: 68}
        assert _actions(sessions, _prefix(key)) == ["api_key_created", "rate_limit_exceeded"]
        # Claims of 20: the two processes never pass the limit together, and hold back at
        # most what their last claims left unused when their clients finished first.
        high = _key(sessions, limit=RateLimit(requests=1280, window_s=3600))
        codes = _sixteen_clients(ports, high, 100)
        assert codes[200] + codes[429] == 1600
        assert 1280 - 2 * ratelimit.lease_size(1280) <= codes[200] <= 1280
        for daemon in daemons:
            assert daemon.terminate() == 0
    finally:
        for daemon in daemons:
            daemon.close()
