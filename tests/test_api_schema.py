"""schemathesis with all its checks over every operation of the API (health routes
included), through a real HTTP server: every phase (examples, coverage, fuzzing,
stateful) and every check. The only failures allowed are the ones README.md names as by
design ("What schemathesis reports by design"); anything else fails this test with
schemathesis' own report. Examples are bounded so the run stays a few seconds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from escrowd.daemon.api import create_app
from escrowd.daemon.health import ReadinessProbe, mount_health
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import ApiScope
from escrowd.models.db import make_engine, make_session_factory
from tests.escrow_fixtures import PLATFORM, derivers, make_key, make_settings, seed_agents

# (failure code, error type, message pattern) schemathesis may report; README.md lists
# each with its reason. ST202: a request valid by the schema was refused by a rule the
# schema cannot state. ST302: an idempotent replay returned a resource deleted since.
BY_DESIGN = [
    ("ST202", "validation_error", r"fee_bps: Input should be a valid integer"),
    ("ST202", "validation_error", r"buyer and worker must be different agents"),
    ("ST202", "validation_error", r"expires_at .* has already passed"),
    ("ST202", "invalid_amount", r"decimal places; this asset has|is too large"),
    ("ST202", "invalid_address", r"."),
    ("ST202", "insufficient_funds", r"."),
    ("ST302", "webhook_endpoint_not_found", r"."),
]
_FAILURE = re.compile(
    r"^- (?P<code>ST\d+|[A-Z]+\d+) (?P<rest>.*?)(?=^- [A-Z]+\d+ |\Z)", re.M | re.S
)
_BODY = re.compile(r"`(\{.*?\})`")


@pytest.fixture
def server(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    seed_agents(sessions, "alice", "bob", balance=50_000_000)
    key = make_key(sessions, ApiScope.ADMIN)
    app = create_app(
        make_settings(tmp_path),
        engine,
        deriver=derivers(),
        webhook_cipher=SecretCipher(bytes(32)),
        platform=PLATFORM,
    )
    mount_health(app, ReadinessProbe(engine))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started, "the API server did not start"
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", key
    uv.should_exit = True
    thread.join(timeout=10)
    engine.dispose()


def _by_design(code: str, text: str) -> bool:
    found = _BODY.search(text)
    if found is None:
        return False
    try:
        error = json.loads(found.group(1))["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return any(
        code == allowed_code
        and error.get("type") == error_type
        and re.search(pattern, error.get("message", ""))
        for allowed_code, error_type, pattern in BY_DESIGN
    )


def test_schemathesis_all_checks_find_only_what_is_by_design(
    server: tuple[str, str], tmp_path: Path
) -> None:
    url, key = server
    report = tmp_path / "junit.xml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--header",
            f"Authorization: Bearer {key}",
            "--max-examples",
            "3",
            "--generation-deterministic",
            "--no-color",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        # schemathesis keeps a cache of past failures in its working directory.
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert report.exists(), output
    cases = ET.parse(report).getroot().iter("testcase")
    tested, unexpected = 0, []
    for case in cases:
        tested += case.get("name", "").startswith(("GET ", "POST ", "DELETE "))
        for failure in case.iter("failure"):
            text = failure.text or ""
            blocks = [(m.group("code"), m.group("rest")) for m in _FAILURE.finditer(text)]
            assert blocks, text
            unexpected += [
                f"{case.get('name')}: {code} {rest[:600]}"
                for code, rest in blocks
                if not _by_design(code, rest)
            ]
        for error in case.iter("error"):
            unexpected.append(f"{case.get('name')}: error {(error.text or '')[:600]}")
    assert tested >= 26, output
    assert unexpected == [], "\n\n".join(unexpected)
