"""escrowd.client held to the API's own description, /openapi.json, without a server.

Generated from the document, so an operation or event type added to the API fails here
until the client has it: every operation (method and path) has a client method in both
clients that sends exactly that request, with names the API declares (no deprecated
ones: `network`, never `chain`) and an Idempotency-Key exactly where the API takes one;
every webhook event type's example reads into its own typed event, field by field; and
the Standard Webhooks signature is checked as the reference library makes it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
import types
import typing
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
import standardwebhooks
from pydantic import BaseModel

from escrowd.client import (
    AsyncEscrowdClient,
    EscrowdClient,
    OtherEvent,
    RetryPolicy,
    SubscriptionConflict,
    SubscriptionEvent,
    UnsupportedDepositEvent,
    parse_event,
    verify_webhook,
)
from escrowd.client import operations as ops
from escrowd.client.calls import IDEMPOTENCY_HEADER, Call
from escrowd.client.webhooks import EVENT_CLASSES
from escrowd.daemon.api import create_app
from escrowd.escrow.events import API_VERSION, EVENT_TYPES
from escrowd.escrow.webhooks import (
    SignatureHeaderInvalid,
    SignatureMismatch,
    TimestampOutOfTolerance,
    new_secret,
    signature_headers,
)
from escrowd.models.db import make_engine
from tests.escrow_fixtures import make_settings

ONCE = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    settings = make_settings(tmp_path_factory.mktemp("openapi"))
    document: dict[str, Any] = create_app(settings, make_engine("sqlite://")).openapi()
    return document


def _operations(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    }


# --- sample arguments from the type hints of an operation --------------------------------


def _sample(name: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return typing.get_args(hint)[0]
    if origin in (typing.Union, types.UnionType):
        return _sample(name, next(a for a in typing.get_args(hint) if a is not type(None)))
    if hint is str:
        return f"{name.replace('_', '-')}-1"
    if hint is int:
        return 7
    if hint is Decimal:
        return Decimal("1.5")
    if hint is datetime:
        return datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    if origin is Iterable or hint is Iterable:
        return ["escrow.funded"]
    raise AssertionError(f"no sample for parameter {name}: {hint!r}; add one to the test")


def _arguments(function: Callable[..., Any], *, every: bool) -> dict[str, Any]:
    """Values for the required parameters of an operation, or for all of them."""
    hints = typing.get_type_hints(function)
    return {
        name: _sample(name, hints[name])
        for name, parameter in inspect.signature(function).parameters.items()
        if every or parameter.default is inspect.Parameter.empty
    }


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        found: dict[str, Any] = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        return found
    if "anyOf" in schema:  # an optional body: its object
        return _resolve(spec, next(s for s in schema["anyOf"] if s.get("type") != "null"))
    return schema


def _check_body(
    spec: dict[str, Any], schema: dict[str, Any], body: dict[str, Any], where: str
) -> None:
    """Every field sent is a property the API declares and does not deprecate (nested
    objects too)."""
    properties = _resolve(spec, schema)["properties"]
    for name, value in body.items():
        assert name in properties, f"{where}: the API takes no field {name!r}"
        declared = _resolve(spec, properties[name])
        assert not declared.get("deprecated"), f"{where}: {name!r} is deprecated in the API"
        if isinstance(value, dict):
            _check_body(spec, declared, value, f"{where}.{name}")


def _path_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)))


def test_every_api_operation_has_a_client_method_sending_that_request(
    spec: dict[str, Any],
) -> None:
    documented = _operations(spec)
    missing = sorted(set(documented) - set(ops.OPERATIONS))
    assert not missing, f"API operations without a client method (add to OPERATIONS): {missing}"
    stale = sorted(set(ops.OPERATIONS) - set(documented))
    assert not stale, f"client operations the API does not have: {stale}"

    for route, name in ops.OPERATIONS.items():
        method, template = route.split(" ", 1)
        operation = documented[route]
        builder = getattr(ops, name)
        query = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}
        headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
        body_schema = operation.get("requestBody", {}).get("content", {}).get("application/json")
        for every in (False, True):
            call: Call[Any] = builder(**_arguments(builder, every=every))
            assert (call.method, bool(_path_pattern(template).fullmatch(call.path))) == (
                method,
                True,
            ), f"{name} sends {call.method} {call.path}, not {route}"
            assert call.keyed == (IDEMPOTENCY_HEADER in headers), f"{name}: Idempotency-Key"
            for param in call.params or {}:
                assert param in query, f"{name}: {route} takes no ?{param}="
                assert not query[param].get("deprecated"), f"{name}: ?{param}= is deprecated"
            if call.body is None:
                assert body_schema is None or not operation["requestBody"].get("required"), name
                continue
            assert body_schema is not None, f"{name} sends a body {route} does not take"
            _check_body(spec, body_schema["schema"], dict(call.body), name)
            if not every:
                required = set(_resolve(spec, body_schema["schema"]).get("required", []))
                assert required <= set(call.body), f"{name} leaves out {required - set(call.body)}"
        # Every optional filter of a list is something the client can send.
        sendable = set((builder(**_arguments(builder, every=True)).params or {}).keys())
        declared = {n for n, p in query.items() if not p.get("deprecated")}
        assert declared <= sendable, f"{name} cannot send ?{sorted(declared - sendable)}"


def _recording(
    seen: list[httpx.Request],
) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            409, json={"error": {"type": "subscription_conflict", "message": "recorded"}}
        )

    return answer


def test_both_clients_send_each_operation_as_described() -> None:
    """Each client method passes all its arguments to its operation: the request on the
    wire is the one the operation describes, from the sync and the async client alike."""
    seen: list[httpx.Request] = []
    sync = EscrowdClient(
        "http://escrowd.test",
        "esk_a_b",
        retry=ONCE,
        transport=httpx.MockTransport(_recording(seen)),
    )
    aio = AsyncEscrowdClient(
        "http://escrowd.test",
        "esk_a_b",
        retry=ONCE,
        transport=httpx.MockTransport(_recording(seen)),
    )

    async def on_async(name: str, arguments: dict[str, Any]) -> None:
        method = getattr(aio, name)
        assert inspect.iscoroutinefunction(method), f"AsyncEscrowdClient.{name} is not async"
        with pytest.raises(SubscriptionConflict):
            await method(**arguments, **_key(method))

    def _key(method: Callable[..., Any]) -> dict[str, str]:
        keyed = "idempotency_key" in inspect.signature(method).parameters
        return {"idempotency_key": "key-1"} if keyed else {}

    for name in ops.OPERATIONS.values():
        builder = getattr(ops, name)
        arguments = _arguments(builder, every=True)
        call: Call[Any] = builder(**arguments)
        expected = httpx.Request(
            call.method,
            f"http://escrowd.test{call.path}",
            params=call.params,
            json=call.body,
        )
        with pytest.raises(SubscriptionConflict):
            getattr(sync, name)(**arguments, **_key(getattr(sync, name)))
        asyncio.run(on_async(name, arguments))
        for request in seen:
            assert (request.method, str(request.url), request.content) == (
                expected.method,
                str(expected.url),
                expected.content,
            ), name
            assert request.headers.get(IDEMPOTENCY_HEADER) == ("key-1" if call.keyed else None)
        assert len(seen) == 2
        seen.clear()
    sync.close()
    asyncio.run(aio.aclose())


# --- webhook events -----------------------------------------------------------------------


def _same(sent: Any, read: Any, where: str) -> None:
    """A value of an example as the typed event holds it: amounts as integers, times as
    datetimes, objects as models."""
    if isinstance(read, BaseModel):
        assert isinstance(sent, dict), where
        for name, value in sent.items():
            assert name in type(read).model_fields, f"{where}: the client drops {name!r}"
            _same(value, getattr(read, name), f"{where}.{name}")
    elif isinstance(read, datetime):
        assert read == datetime.fromisoformat(sent), where
    elif isinstance(read, int) and isinstance(sent, str):
        assert read == int(sent), where
    else:
        assert read == sent, where


def test_every_event_type_reads_into_its_typed_event(spec: dict[str, Any]) -> None:
    assert set(spec["webhooks"]) == EVENT_TYPES
    untyped = sorted(EVENT_TYPES - set(EVENT_CLASSES))
    assert not untyped, f"event types read as OtherEvent (give them a class): {untyped}"
    assert set(EVENT_CLASSES) == EVENT_TYPES
    for event_type, item in spec["webhooks"].items():
        body = item["post"]["requestBody"]["content"]["application/json"]
        example = body["examples"]["example"]["value"]
        event = parse_event(json.dumps(example), "9")
        assert type(event) is EVENT_CLASSES[event_type], event_type
        assert (event.id, event.type, event.api_version) == ("9", event_type, API_VERSION)
        _same(example["data"], event.data, event_type)

    unsupported = parse_event(json.dumps(_example(spec, "deposit.unsupported")))
    assert isinstance(unsupported, UnsupportedDepositEvent)
    assert unsupported.data.amount_base_units == 5 * 10**18  # an 18-decimal token, exact
    skipped = parse_event(json.dumps(_example(spec, "subscription.periods_skipped")))
    assert isinstance(skipped, SubscriptionEvent) and skipped.data.skipped_to_period == 4
    paused = parse_event(json.dumps(_example(spec, "subscription.paused")))
    assert isinstance(paused, SubscriptionEvent) and paused.data.charge is not None
    assert paused.data.charge.status == "failed" and paused.data.next_charge_at is None
    newer = parse_event(json.dumps({"type": "payout.teleported", "api_version": "x", "data": {}}))
    assert isinstance(newer, OtherEvent)


def _example(spec: dict[str, Any], event_type: str) -> dict[str, Any]:
    content = spec["webhooks"][event_type]["post"]["requestBody"]["content"]
    example: dict[str, Any] = content["application/json"]["examples"]["example"]["value"]
    return example


# --- Standard Webhooks signatures ---------------------------------------------------------

SECRET = new_secret()


def _standard(payload: bytes, msg_id: str = "42", at: int | None = None) -> dict[str, str]:
    """The headers a Standard Webhooks sender makes, by the reference library."""
    stamp = int(time.time()) if at is None else at
    signature = standardwebhooks.Webhook(SECRET).sign(
        msg_id, datetime.fromtimestamp(stamp, UTC), payload
    )
    return {"webhook-id": msg_id, "webhook-timestamp": str(stamp), "webhook-signature": signature}


def test_standard_webhooks_signature_is_verified(spec: dict[str, Any]) -> None:
    payload = json.dumps(_example(spec, "payout.confirmed")).encode()

    event = verify_webhook(payload, _standard(payload, "evt-7"), SECRET)

    assert event.id == "evt-7" and event.type == "payout.confirmed"
    # Several signatures (a rotation) pass when one matches; the id is the signed one.
    headers = _standard(payload)
    headers["webhook-signature"] = "v1,AAAA " + headers["webhook-signature"]
    assert verify_webhook(payload, {**headers, "Escrowd-Event-Id": "other"}, SECRET).id == "42"
    with pytest.raises(SignatureMismatch):
        verify_webhook(payload.replace(b"10000000", b"90000000"), _standard(payload), SECRET)
    with pytest.raises(SignatureMismatch):
        verify_webhook(payload, _standard(payload), "whsec_" + "A" * 32)
    with pytest.raises(SignatureMismatch):  # the id is signed: another id is another message
        verify_webhook(payload, {**_standard(payload), "webhook-id": "43"}, SECRET)
    with pytest.raises(TimestampOutOfTolerance):
        verify_webhook(payload, _standard(payload, at=int(time.time()) - 600), SECRET)
    without_id = {k: v for k, v in _standard(payload).items() if k != "webhook-id"}
    with pytest.raises(SignatureHeaderInvalid):
        verify_webhook(payload, without_id, SECRET)
    with pytest.raises(SignatureHeaderInvalid):
        verify_webhook(payload, {**_standard(payload), "webhook-signature": "v2,abc"}, SECRET)


def test_a_delivery_with_both_signatures_needs_both_to_match(spec: dict[str, Any]) -> None:
    payload = json.dumps(_example(spec, "escrow.released")).encode()
    # Exactly what escrowd's sender puts on a delivery.
    delivery = signature_headers(payload, SECRET, 11, int(time.time()))

    event = verify_webhook(payload, delivery, SECRET)

    assert event.id == "11" and event.type == "escrow.released"
    forged = {**delivery, "Escrowd-Signature": f"t={int(time.time())},v1=" + "0" * 64}
    with pytest.raises(SignatureMismatch):
        verify_webhook(payload, forged, SECRET)
    only_escrowd = {"Escrowd-Signature": delivery["Escrowd-Signature"], "Escrowd-Event-Id": "11"}
    assert verify_webhook(payload, only_escrowd, SECRET).id == "11"
    with pytest.raises(SignatureHeaderInvalid, match="no signature"):
        verify_webhook(payload, {"webhook-id": "11", "Escrowd-Event-Id": "11"}, SECRET)


def test_every_client_method_that_sends_is_an_api_operation() -> None:
    senders = {
        name
        for name, member in vars(EscrowdClient).items()
        if callable(member) and not name.startswith(("_", "iter_"))
    } - {"close", "send"}
    assert senders == set(ops.OPERATIONS.values())


# --- answers ------------------------------------------------------------------------------

# Fields of answers a value names otherwise, and fields it leaves out on purpose: the
# caller named them in the request, or they follow from other fields.
RENAMED = {"agent_id": "agent", "data": "items"}
NOT_CARRIED = {
    ("BalancesOut", "agent_id"),  # balances(agent_id) returns the agent's list
    ("SubscriptionOut", "payee"),  # "platform" exactly when worker is None
    ("WebhookSecretOut", "endpoint_id"),  # rotate_webhook_secret(endpoint_id) returns the secret
}


def _answer_sample(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A JSON answer of `schema`, every optional part present."""
    schema = _resolve(spec, schema)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        return {name: _answer_sample(spec, sub) for name, sub in properties.items()}
    if kind == "array":
        return [_answer_sample(spec, schema["items"])]
    if kind == "integer":
        return 5
    if kind == "boolean":
        return True
    if kind == "string":
        if schema.get("format") == "date-time":
            return "2026-12-01T00:00:00Z"
        return "5" if schema.get("pattern") == "^-?[0-9]+$" else "text"
    raise AssertionError(f"no sample for {schema}")


def _carried(
    spec: dict[str, Any], schema: dict[str, Any], sent: Any, value: Any, where: str
) -> None:
    """Every field of the answer `sent` is in the value the client returned, as sent."""
    name = schema.get("$ref", "").rsplit("/", 1)[-1]
    schema = _resolve(spec, schema)
    properties = schema.get("properties")
    if schema.get("type") == "array":
        assert isinstance(value, list | tuple) and len(value) == 1, where
        _carried(spec, schema["items"], sent[0], value[0], f"{where}[]")
        return
    if properties is None or isinstance(value, dict):  # a leaf, or free-form details
        _same(sent, value, where)
        return
    wanted = {
        field: sub
        for field, sub in properties.items()
        if not _resolve(spec, sub).get("deprecated")
        and (name, field) not in NOT_CARRIED
        and f"{field}_base_units" not in properties  # the decimal text of an amount
    }
    assert value is not None, f"{where}: the client reads None from the {name} it got"
    if not hasattr(value, "__dataclass_fields__"):  # an envelope the client unwraps
        [(field, sub)] = wanted.items()
        _carried(spec, sub, sent[field], value, f"{where}.{field}")
        return
    for field, sub in wanted.items():
        attribute = RENAMED.get(field, field)
        assert hasattr(value, attribute), f"{where}: the client drops {field!r} ({name})"
        _carried(spec, sub, sent[field], getattr(value, attribute), f"{where}.{field}")


def test_every_field_of_every_answer_reaches_the_value(spec: dict[str, Any]) -> None:
    for route, name in ops.OPERATIONS.items():
        operation = _operations(spec)[route]
        success = next(r for status, r in operation["responses"].items() if status[0] == "2")
        schema = success["content"]["application/json"]["schema"]
        builder = getattr(ops, name)
        call: Call[Any] = builder(**_arguments(builder, every=False))
        sent = _answer_sample(spec, schema)
        _carried(spec, schema, sent, call.read(sent), name)
