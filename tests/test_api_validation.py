"""Input is refused at the edge with a typed 4xx and changes nothing (issue #20 items 3-5):
NUL and control characters anywhere, loose JSON types, timestamps that are not RFC 3339
or not ahead, addresses that only an `assert` used to stop, header limits, 405 with
Allow, and an OpenAPI document that says all of this."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.daemon.api import create_app
from escrowd.daemon.health import ReadinessProbe, mount_health
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import ApiScope, Escrow
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.addresses import validate_evm_address
from escrowd.wallets.errors import InvalidAddress
from tests.escrow_fixtures import (
    PLATFORM,
    available,
    derivers,
    make_key,
    make_settings,
    seed_agents,
)

NUL = "a\x00b"
EVM_ADDRESS = "0x" + "12" * 20
# A valid value for each path parameter, so a request differs from a good one only in
# the parameter under test.
PATH_VALUES = {
    "agent_id": "alice",
    "job_id": "job-1",
    "chain_family": "evm",
    "withdrawal_id": "1",
    "endpoint_id": "1",
    "delivery_id": "1",
    "subscription_id": "sub-1",
}
# A valid body for each operation that takes one (a new operation must add its own).
BODIES: dict[str, dict[str, Any]] = {
    "POST /v1/agents": {"id": "carol", "name": "Carol"},
    "POST /v1/escrows": {
        "job_id": "job-1",
        "buyer": "alice",
        "worker": "bob",
        "asset": "USDC",
        "amount": "1",
        "expires_at": "2099-01-01T00:00:00Z",
    },
    "POST /v1/escrows/{job_id}/resolve": {"worker_amount": "0.5"},
    "POST /v1/withdrawals": {
        "agent_id": "alice",
        "asset": "USDC",
        "network": "base",
        "to_address": EVM_ADDRESS,
        "amount": "1",
    },
    "POST /v1/webhook-endpoints": {"url": "https://example.com/hooks", "event_types": ["*"]},
    "POST /v1/deposit-funded-escrows": {
        "job_id": "job-2",
        "worker": "bob",
        "deposit": {"network": "base", "tx_hash": "0x" + "ab" * 32},
    },
    "POST /v1/subscriptions": {
        "id": "sub-1",
        "buyer": "alice",
        "worker": "bob",
        "asset": "USDC",
        "amount": "1",
        "interval": "month",
    },
    "POST /v1/subscriptions/{subscription_id}/cancel": {"requested_by": "marketplace"},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Any:
    """One SQLite database and app for the module: every request here is refused, so
    none of them changes what the next one sees."""
    tmp = tmp_path_factory.mktemp("validation")
    path = tmp / "escrowd.db"
    path.write_bytes(sqlite_template.read_bytes())
    engine = make_engine(f"sqlite:///{path}")
    sessions = make_session_factory(engine)
    ids = seed_agents(sessions, "alice", "bob", balance=5_000_000)
    app = create_app(
        make_settings(tmp),
        engine,
        deriver=derivers(),
        webhook_cipher=SecretCipher(bytes(32)),
        platform=PLATFORM,
    )
    mount_health(app, ReadinessProbe(engine))
    client = TestClient(app, raise_server_exceptions=False)
    key = make_key(sessions, ApiScope.ADMIN)
    yield client, {"Authorization": f"Bearer {key}"}, sessions, ids
    engine.dispose()


def _string_schema(schema: dict[str, Any]) -> bool:
    options = schema.get("anyOf", [schema])
    return any(option.get("type") == "string" for option in options)


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    ]


def _nul_requests(spec: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(operation, field, location, request) for every string parameter of every
    operation and every string in every request body, with NUL in that one value."""
    cases = []
    for method, path, operation in _operations(spec):
        label = f"{method} {path}"
        params = operation.get("parameters", [])
        for target in params:
            if not _string_schema(target["schema"]):
                continue
            values = {p["name"]: PATH_VALUES[p["name"]] for p in params if p["in"] == "path"}
            headers = {"Idempotency-Key": "nul-test"}
            query: dict[str, str] = {}
            if target["in"] == "path":
                values[target["name"]] = NUL
            elif target["in"] == "query":
                query[target["name"]] = NUL
            else:
                headers[target["name"]] = NUL
            url = path.format(**{name: quote(value, safe="") for name, value in values.items()})
            request = {"method": method, "url": url, "params": query, "headers": headers}
            if label in BODIES:
                request["json"] = BODIES[label]
            cases.append((label, target["name"], target["in"], request))
        body_ref = (
            operation.get("requestBody", {})
            .get("content", {})
            .get("application/json", {})
            .get("schema", {})
            .get("$ref")
        )
        if body_ref is None:
            continue
        assert label in BODIES, f"add a valid body for {label} to BODIES"
        schema = spec["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
        url = path.format(**PATH_VALUES)
        for name, prop in schema["properties"].items():
            is_list = prop.get("type") == "array"
            if not (is_list and _string_schema(prop["items"])) and not _string_schema(prop):
                continue
            body = {**BODIES[label], name: [NUL] if is_list else NUL}
            if name == "chain":  # the old name of network: sent instead of it
                body.pop("network")
            request = {
                "method": method,
                "url": url,
                "json": body,
                "headers": {"Idempotency-Key": "nul-test"},
            }
            cases.append((label, name, "body", request))
    return cases


def test_nul_in_every_string_parameter_of_every_operation_is_a_4xx(world: Any) -> None:
    client, auth, sessions, ids = world
    spec = client.get("/openapi.json").json()
    cases = _nul_requests(spec)
    # Path, query, header and body strings of the /v1 operations are all covered.
    assert {location for _, _, location, _ in cases} == {"path", "query", "header", "body"}
    assert len(cases) >= 45
    for label, field, location, request in cases:
        headers = {**auth, **request.pop("headers")}
        response = client.request(**request, headers=headers)
        assert 400 <= response.status_code < 500, (label, field, response.text)
        if response.status_code == 400:
            message = response.json()["error"]["message"]
            assert f"{location}.{field}" in message, (label, field, message)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Escrow)) == 0
    assert available(sessions, ids["alice"]) == 5_000_000


CONTROL_AND_ENCODING: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/agents", {"id": "carol", "name": "Carol\nInjected: 1"}, "body.name"),
    ("/v1/agents", {"id": "car ol"}, "body.id"),
    ("/v1/agents", {"id": "carol", "name": "\x1b[31mred"}, "body.name"),
    ("/v1/webhook-endpoints", {"url": "https://example.com/a b"}, "body.url"),
    ("/v1/webhook-endpoints", {"url": "https://exa\tmple.com/"}, "body.url"),
    ("/v1/webhook-endpoints", {"event_types": ["deposit.lost"]}, "deposit.lost"),
]


def test_control_characters_and_bad_encodings_are_refused(world: Any) -> None:
    client, auth, *_ = world
    base = {"/v1/webhook-endpoints": {"url": "https://example.com/hooks"}}
    for n, (url, body, named) in enumerate(CONTROL_AND_ENCODING):
        headers = {**auth, "Idempotency-Key": f"ctl-{n}"}
        response = client.post(url, json={**base.get(url, {}), **body}, headers=headers)
        assert response.status_code == 400, (body, response.text)
        assert named in response.json()["error"]["message"]
    headers = {**auth, "Idempotency-Key": "enc", "Content-Type": "application/json"}
    lone_surrogate = b'{"id": "carol", "name": "\\ud800"}'
    assert client.post("/v1/agents", content=lone_surrogate, headers=headers).status_code == 400
    not_utf8 = b'{"id": "carol", "name": "\xff"}'
    assert client.post("/v1/agents", content=not_utf8, headers=headers).status_code == 400
    assert client.get("/v1/agents/carol", headers=auth).status_code == 404
    bearer = client.get("/v1/agents/alice", headers={"Authorization": "Bearer esk_\x00_x"})
    assert bearer.status_code == 401


def _escrow(**changes: Any) -> dict[str, Any]:
    return {**BODIES["POST /v1/escrows"], **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fee_bps": True}, "body.fee_bps"),
        ({"fee_bps": "250"}, "body.fee_bps"),
        ({"fee_bps": 250.0}, "body.fee_bps"),
        ({"amount": 1}, "body.amount"),
        ({"expires_at": 4102444800}, "RFC 3339"),
        ({"expires_at": "2099-01-01T00:00:00"}, "RFC 3339"),
        ({"expires_at": "2099-01-01"}, "RFC 3339"),
        ({"expires_at": "2099-02-30T00:00:00Z"}, "not a real date"),
        ({"expires_at": "2020-01-01T00:00:00Z"}, "has already passed"),
    ],
)
def test_loose_types_and_bad_expiry_are_refused(
    world: Any, changes: dict[str, Any], message: str
) -> None:
    client, auth, sessions, ids = world
    digest = hashlib.sha256(repr(changes).encode()).hexdigest()[:16]
    headers = {**auth, "Idempotency-Key": f"strict-{digest}"}
    response = client.post("/v1/escrows", json=_escrow(**changes), headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert client.get("/v1/escrows/job-1", headers=auth).status_code == 404
    assert available(sessions, ids["alice"]) == 5_000_000


def test_evm_address_with_trailing_spaces_is_a_typed_error_also_under_python_o() -> None:
    spaced = "0x" + "ab" * 19 + "  "
    with pytest.raises(InvalidAddress, match="not hex digits"):
        validate_evm_address(spaced)
    # Under -O asserts vanish; the check must not be one.
    script = (
        "from escrowd.wallets.addresses import validate_evm_address\n"
        "from escrowd.wallets.errors import InvalidAddress\n"
        f"try:\n    validate_evm_address({spaced!r})\n"
        "except InvalidAddress:\n    print('refused')\n"
    )
    result = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "refused"


def test_headers_have_limits_and_405_names_the_allowed_methods(world: Any) -> None:
    client, auth, *_ = world
    body = {"id": "dave"}
    missing = client.post("/v1/agents", json=body, headers=auth)
    assert missing.status_code == 400
    assert "header.Idempotency-Key" in missing.json()["error"]["message"]
    for key, status in (("", 400), ("k" * 256, 400), ("has space", 400), ("k" * 255, 201)):
        response = client.post("/v1/agents", json=body, headers={**auth, "Idempotency-Key": key})
        assert response.status_code == status, (key[:10], response.text)
    spec = client.get("/openapi.json").json()
    header = next(
        p for p in spec["paths"]["/v1/agents"]["post"]["parameters"] if p["in"] == "header"
    )
    assert header["required"] is True
    assert (header["schema"]["minLength"], header["schema"]["maxLength"]) == (1, 255)

    for method, url, allowed in (
        ("DELETE", "/v1/withdrawals", "GET, POST"),
        ("PUT", "/v1/agents/alice/deposit-addresses/evm", "GET, POST"),
        ("GET", "/v1/webhook-endpoints/1", "DELETE"),
        ("POST", "/metrics", "GET"),
    ):
        response = client.request(method, url, headers=auth)
        assert response.status_code == 405
        assert response.headers["Allow"] == allowed
        assert response.json()["error"]["type"] == "method_not_allowed"

    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    served = client.get("/metrics")
    assert served.headers["content-type"].startswith("text/plain")
    assert "escrowd_" in served.text


def test_openapi_lists_configured_values_and_refuses_unknown_ones(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    app = create_app(make_settings(tmp_path), engine, webhook_cipher=SecretCipher(bytes(32)))
    client = TestClient(app, raise_server_exceptions=False)
    key = make_key(sessions, ApiScope.READ)
    spec = client.get("/openapi.json").json()
    withdrawal = spec["components"]["schemas"]["WithdrawalCreate"]["properties"]
    assert withdrawal["network"]["enum"] == ["base"]
    assert withdrawal["asset"]["enum"] == ["USDC"]
    assert "x-escrowd-configured" not in str(spec)
    deposits = client.get(
        "/v1/deposits", params={"network": "solana"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert deposits.status_code == 400
    assert deposits.json()["error"] == {
        "type": "unknown_network",
        "message": "unknown network 'solana'; configured networks: base",
    }
