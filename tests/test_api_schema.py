"""Property-based checks of the whole API against its own /openapi.json (schemathesis):
no 5xx, and every response (errors included) matches the documented status, content type
and schema. Examples are bounded per operation so this stays a few seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine

from escrowd.daemon.api import create_app
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import ApiScope
from escrowd.models.db import make_engine, make_session_factory
from tests.escrow_fixtures import PLATFORM, derivers, make_key, make_settings, seed_agents

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Any:
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def admin_key(sqlite_engine: Engine) -> str:
    sessions = make_session_factory(sqlite_engine)
    seed_agents(sessions, "alice", "bob", balance=50_000_000)
    return make_key(sessions, ApiScope.ADMIN)


def test_api_conforms_to_its_schema(sqlite_engine: Engine, admin_key: str, tmp_path: Path) -> None:
    app = create_app(
        make_settings(tmp_path),
        sqlite_engine,
        deriver=derivers(),
        webhook_cipher=SecretCipher(bytes(32)),
        platform=PLATFORM,
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = {"Authorization": f"Bearer {admin_key}"}
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), "every operation in /openapi.json must load"
    assert len(operations) >= 19

    statuses: dict[int, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=10,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        check()
    print(sorted(statuses.items()))
    # Not only rejections: generated requests also reach the handlers and succeed.
    assert sum(count for status, count in statuses.items() if status < 300) >= 20
