"""A thin ASGI front for the hot routes on PostgreSQL, ahead of FastAPI's routing.

A balances read spent about a third of its time in FastAPI's routing, dependency injection
and validation, and a sixth handing the request to a thread and back, around one database
statement. For GET /v1/agents/{id}/balances this front checks the same things (path,
API key and scope) and makes the one statement itself, on the event loop: the statement is
a fraction of a millisecond, and the API runs as several processes.

What the front answers is byte for byte what FastAPI would (tests/test_api_fast.py
compares them): the same response models, the same error types and bodies. Anything it is
not sure of (a malformed path parameter, another method or route, SQLite) it passes to
FastAPI untouched, which also keeps these routes in /openapi.json.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.security.utils import get_authorization_scheme_param
from starlette.responses import JSONResponse, Response

from escrowd.config.errors import EscrowdError
from escrowd.daemon.api_deps import ApiState
from escrowd.daemon.api_schemas import (
    EXTERNAL_ID_PATTERN,
    MAX_EXTERNAL_ID_LENGTH,
    BalanceOut,
    BalancesOut,
)
from escrowd.escrow import service
from escrowd.escrow.money import format_amount
from escrowd.models import ApiScope

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_EXTERNAL_ID = re.compile(EXTERNAL_ID_PATTERN)
_BALANCES_PATH = re.compile(r"/v1/agents/([^/]+)/balances")


def balances_out(agent_id: str, balances: list[service.AssetBalance]) -> BalancesOut:
    return BalancesOut(
        agent_id=agent_id,
        balances=[
            BalanceOut(
                asset=b.asset,
                decimals=b.decimals,
                available=format_amount(b.available, b.decimals),
                available_base_units=str(b.available),
                escrowed_as_buyer=format_amount(b.escrowed_as_buyer, b.decimals),
                escrowed_as_buyer_base_units=str(b.escrowed_as_buyer),
                incoming=format_amount(b.incoming, b.decimals),
                incoming_base_units=str(b.incoming),
                pending_withdrawals=format_amount(b.pending_withdrawals, b.decimals),
                pending_withdrawals_base_units=str(b.pending_withdrawals),
            )
            for b in balances
        ],
    )


def error_response(exc: EscrowdError) -> JSONResponse:
    """The body and status the API's EscrowdError handler answers with."""
    return JSONResponse(
        {"error": {"type": exc.type, "message": exc.message}}, status_code=exc.http_status
    )


def _external_id(text: str) -> bool:
    return 0 < len(text) <= MAX_EXTERNAL_ID_LENGTH and _EXTERNAL_ID.fullmatch(text) is not None


def _bearer_token(scope: Scope) -> str | None:
    """What FastAPI's HTTPBearer(auto_error=False) hands the route: the credentials of
    the first Authorization header when its scheme is Bearer, else None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
            scheme, credentials = get_authorization_scheme_param(authorization)
            if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
                return None
            return credentials
    return None


class FastFront:
    """ASGI middleware: answers the hot routes itself, passes everything else on."""

    def __init__(self, app: AsgiApp, state: ApiState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            found = _BALANCES_PATH.fullmatch(scope["path"])
            if found is not None and _external_id(found.group(1)):
                response = self._balances(scope, found.group(1))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _balances(self, scope: Scope, agent_id: str) -> Response:
        try:
            self.state.authenticate(_bearer_token(scope)).require(ApiScope.READ)
            rows = service.balances_by_statement(self.state.engine, agent_id)
        except EscrowdError as exc:
            return error_response(exc)
        body = balances_out(agent_id, rows).model_dump_json(by_alias=True)
        return Response(body, media_type="application/json")
