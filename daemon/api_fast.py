"""A thin ASGI front for the hot routes on PostgreSQL, ahead of FastAPI's routing.

A balances read spent about a third of its time in FastAPI's routing, dependency injection
and validation, and a sixth handing the request to a thread and back, around one database
statement. For GET /v1/agents/{id}/balances, POST /v1/escrows and POST
/v1/escrows/{job}/release this front checks the same things (path, API key and scope,
Idempotency-Key, body) and makes the database calls itself. Balances and the first page
of GET /v1/deposits are one round trip (the caller's key and the read, plain columns, no
ORM objects); so are fund and release: one statement of migration 0017 (the key check when
this process counts the key itself, the escrow operation and its idempotency record with
the response, rendered by PostgreSQL byte for byte as the API renders it), sent with the
read of the caller's key. The writes' waits for PostgreSQL are awaited on the event loop
(models.db), so one process keeps many in flight without threads and their commits share
a disk flush; a read waits on the loop (see `_read`).

What the front answers is byte for byte what FastAPI would (tests/test_api_fast.py
compares them): the same response models, the same error types and bodies. Anything it is
not sure of it passes to FastAPI untouched, the body it read replayed: a malformed
parameter, header or body (FastAPI words the 400), a request that fails before the
escrow call (unknown agent or asset, bad amount: the idempotency record decides between
that error and a replay), a database error (FastAPI's path retries), another route,
SQLite. Those routes stay in /openapi.json as FastAPI describes them.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from datetime import UTC
from typing import Any, Literal
from urllib.parse import parse_qsl

from fastapi.security.utils import get_authorization_scheme_param
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.responses import JSONResponse, Response

from escrowd.config.errors import EscrowdError
from escrowd.daemon.api_deps import REPLAY_HEADER, ApiState, in_future
from escrowd.daemon.api_schemas import (
    EXTERNAL_ID_PATTERN,
    MAX_EXTERNAL_ID_LENGTH,
    BalanceOut,
    BalancesOut,
    DepositOut,
    DepositPage,
    EscrowCreate,
)
from escrowd.escrow import apikeys, idempotency, ratelimit, service
from escrowd.escrow.audit import canonical_json
from escrowd.escrow.money import format_amount, parse_amount
from escrowd.models import ApiScope, DepositCreditState
from escrowd.models.db import (
    statement_rows,
    statements_rows,
    statements_rows_async,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


_EXTERNAL_ID = re.compile(EXTERNAL_ID_PATTERN)
_BALANCES_PATH = re.compile(r"/v1/agents/([^/]+)/balances")
_RELEASE_PATH = re.compile(r"/v1/escrows/([^/]+)/release")
# api_deps.IdempotencyKeyHeader's constraints.
_IDEMPOTENCY_KEY = re.compile(rf"[!-~]{{1,{idempotency.MAX_KEY_LENGTH}}}")


_DEPOSIT_COLUMNS = (
    "SELECT d.id, ag.external_id, d.chain, s.symbol, s.decimals, d.amount, d.tx_hash, "
    "d.log_index, d.block_number, d.status, d.credited, d.credit_state, "
    "d.credited_base_units, d.dust_base_units, d.credit_note, d.created_at "
    "FROM deposits d JOIN agents ag ON ag.id = d.agent_id JOIN assets s ON s.id = d.asset_id "
)
# service.list_deposits' order and filters, for the parameters the front takes.
_DEPOSITS = _DEPOSIT_COLUMNS + "WHERE d.id > %s ORDER BY d.id LIMIT %s"
_AGENT_DEPOSITS = _DEPOSIT_COLUMNS + "WHERE d.agent_id = %s AND d.id > %s ORDER BY d.id LIMIT %s"
# What FastAPI's int query parameters take from these without a doubt.
_POSITIVE = re.compile(r"[1-9][0-9]{0,17}")
ROW_ID_MAX = 2**62


def deposit_family(state: ApiState, network: str) -> Literal["evm", "solana"]:
    """A stored network's (a deposit's, a payout's) chain family; a network no longer
    configured is told by its address format (EVM networks are those not Solana)."""
    known = state.networks.get(network)
    if known is not None:
        return "solana" if known == "solana" else "evm"
    return "solana" if network == "solana" else "evm"


class _Unsure(Exception):
    """Something FastAPI words its own way: hand the request to it."""


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


def _header(scope: Scope, name: bytes) -> str | None:
    """The first header `name` (lower case), as Starlette's Headers.get reads it."""
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


def _bearer_token(scope: Scope) -> str | None:
    """What FastAPI's HTTPBearer(auto_error=False) hands the route: the credentials of
    the first Authorization header when its scheme is Bearer, else None."""
    authorization = _header(scope, b"authorization")
    if authorization is None:
        return None
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        return None
    return credentials


def _idempotency_key(scope: Scope) -> str:
    key = _header(scope, b"idempotency-key")
    if key is None or _IDEMPOTENCY_KEY.fullmatch(key) is None:
        raise _Unsure
    return key


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # The client went away: FastAPI meets the same disconnect on replay.
            raise _Unsure
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """`receive` for FastAPI after the front read the body: the body again, then the
    client's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json_body(scope: Scope, body: bytes) -> Any:
    content_type = _header(scope, b"content-type")
    if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
        raise _Unsure
    try:
        return json.loads(body)
    except ValueError:
        raise _Unsure from None


def _number(text: str, maximum: int) -> int:
    if _POSITIVE.fullmatch(text) is None or int(text) > maximum:
        raise _Unsure
    return int(text)


def _replayed(stored: idempotency.StoredResponse) -> Response:
    return Response(
        content=stored.body,
        status_code=stored.status,
        media_type="application/json",
        headers={REPLAY_HEADER: "true"},
    )


class FastFront:
    """ASGI middleware: answers the hot routes itself, passes everything else on."""

    def __init__(self, app: AsgiApp, state: ApiState) -> None:
        self.app = app
        self.state = state
        # Lookups that miss the process's caches (an asset's decimals) read through this
        # one session: the front runs on the event loop thread, one request at a time
        # between awaits, and a session per request cost a tenth of a fund's client CPU
        # though it rarely connects. A caller running the app on several threads (a test
        # client) gets a session of its own while another thread uses this one.
        self._reader = state.readers()
        self._reader_free = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        response: Response | None = None
        try:
            if method == "GET" and path == "/v1/deposits":
                response = self._deposits(scope)
            elif method == "GET":
                found = _BALANCES_PATH.fullmatch(path)
                if found is not None and _external_id(found.group(1)):
                    response = self._balances(scope, found.group(1))
            elif method == "POST" and path == "/v1/escrows":
                body = await _read_body(receive)
                receive = _replaying(body, receive)
                response = await self._fund(scope, body)
            elif method == "POST":
                found = _RELEASE_PATH.fullmatch(path)
                if found is not None and _external_id(found.group(1)):
                    response = await self._release(scope, found.group(1))
        except (_Unsure, DBAPIError):
            # A database error too: FastAPI's path retries what can be retried.
            response = None
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """The front's read session; it gives its connection back after a lookup that
        used one."""
        if not self._reader_free.acquire(blocking=False):
            with self.state.readers() as session:
                yield session
            return
        try:
            yield self._reader
        finally:
            if self._reader.in_transaction():
                self._reader.close()
            self._reader_free.release()

    def _read(self, scope: Scope, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The rows of `sql`, read in the round trip that reads and counts the caller's API
        key; they are used only once the key is verified, within its rate limit and holding
        the read scope.

        On the event loop, waiting for the answer there (a fraction of a millisecond): an
        awaited read let each process keep all its connections' reads in flight at once,
        and with PostgreSQL on the same cores p99 went from 12-15 ms to 80-430 ms at 16
        connections for 10-25 % more reads per second (bench/RESULTS.md)."""
        read = self.state.key_read(_bearer_token(scope))
        # A claim writes the key's window row: its own transaction, so that its row lock is
        # not held through the read; a request the process hands out only reads its key.
        key_rows, rows = statements_rows(
            self.state.engine,
            [(read.sql, read.params), (sql, params)],
            reads=read.leased is not None,
        )
        principal, quota = self.state.admitted(read, key_rows)
        self.state.admit(principal, quota, scope, ApiScope.READ)
        return rows

    def _balances(self, scope: Scope, agent_id: str) -> Response:
        try:
            rows = self._read(scope, service.PG_BALANCES, (agent_id,))
            balances = service.balances_of_rows(agent_id, rows)
        except EscrowdError as exc:
            return error_response(exc)
        body = balances_out(agent_id, balances).model_dump_json(by_alias=True)
        return Response(body, media_type="application/json")

    def _deposits(self, scope: Scope) -> Response:
        """GET /v1/deposits as api.list_deposits answers it, for the parameters limit,
        cursor and agent; other filters go to FastAPI."""
        params = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        given = dict(params)
        if len(given) != len(params) or not set(given) <= {"limit", "cursor", "agent"}:
            raise _Unsure
        page_max = self.state.settings.api.page_size_max
        limit = _number(given.get("limit", "50"), page_max)
        after = _number(given["cursor"], ROW_ID_MAX) if "cursor" in given else 0
        agent = given.get("agent")
        if agent is not None and not _external_id(agent):
            raise _Unsure
        try:
            if agent is None:
                rows = self._read(scope, _DEPOSITS, (after, limit))
            else:
                # The agent is looked up after the key, as FastAPI's route does.
                principal, quota = self.state.authenticate(_bearer_token(scope))
                self.state.admit(principal, quota, scope, ApiScope.READ)
                owner = self.state.agent(agent).id
                rows = statement_rows(self.state.engine, _AGENT_DEPOSITS, (owner, after, limit))
        except EscrowdError as exc:
            return error_response(exc)
        page = DepositPage(
            data=[self._deposit_out(row) for row in rows],
            next_cursor=rows[-1][0] if len(rows) == limit else None,
        )
        return Response(page.model_dump_json(by_alias=True), media_type="application/json")

    def _deposit_out(self, row: tuple[Any, ...]) -> DepositOut:
        (id_, agent_id, chain, symbol, decimals, amount, tx_hash, log_index, block_number) = row[:9]
        status, credited, credit_state, credited_units, dust, note, created_at = row[9:]
        amount = int(amount)
        return DepositOut(
            id=id_,
            agent_id=agent_id,
            network=chain,
            chain=chain,
            chain_family=deposit_family(self.state, chain),
            asset=symbol,
            amount=format_amount(amount, decimals),
            amount_base_units=str(amount),
            tx_hash=tx_hash,
            log_index=log_index,
            block_number=block_number,
            status=status,
            credited=credited,
            credit_state=credit_state,
            credited_base_units=str(credited_units),
            # credit_view: a reversal short by what of its credit still stands.
            reversal_shortfall_base_units=str(
                credited_units if credit_state == DepositCreditState.REVERSAL_SHORT else 0
            ),
            dust_base_units=str(int(dust)),
            credit_note=note,
            created_at=created_at.astimezone(UTC),
        )

    async def _writer(self, scope: Scope) -> ratelimit.KeyRead | apikeys.Principal:
        """The caller of a write: its principal, checked and counted here when this
        process must claim requests of the key's window (a write of its own, kept out of
        the escrow transaction); else how to read its key, sent with the escrow call (a
        read, one round trip fewer)."""
        read = self.state.key_read(_bearer_token(scope))
        if read.leased is None:
            principal, quota = self.state.admitted(read, await self._key_rows(read))
            return self.state.admit(principal, quota, scope, ApiScope.WRITE)
        return read

    async def _key_rows(self, read: ratelimit.KeyRead) -> list[tuple[Any, ...]]:
        [rows] = await statements_rows_async(self.state.engine, [(read.sql, read.params)])
        return rows

    async def _handed_on(
        self, scope: Scope, caller: ratelimit.KeyRead | apikeys.Principal
    ) -> Response:
        """Pass a write to FastAPI (raises _Unsure); a caller whose key was not read yet is
        read and counted first, so FastAPI does not count the request again, and answered
        here when that check fails."""
        if isinstance(caller, ratelimit.KeyRead):
            try:
                principal, quota = self.state.admitted(caller, await self._key_rows(caller))
                self.state.admit(principal, quota, scope, ApiScope.WRITE)
            except EscrowdError as exc:
                return error_response(exc)
        raise _Unsure

    async def _fund(self, scope: Scope, raw: bytes) -> Response:
        """POST /v1/escrows as api.create_escrow and api_deps.mutate answer it."""
        parsed = _json_body(scope, raw)
        try:
            caller = await self._writer(scope)
        except EscrowdError as exc:
            return error_response(exc)
        prefix = caller.prefix
        state = self.state
        try:
            key = _idempotency_key(scope)
            try:
                body = EscrowCreate.model_validate(parsed)
            except ValidationError:
                raise _Unsure from None
            with self._session() as session:
                decimals = service.asset_decimals(session, body.asset)
            fee_bps = body.fee_bps
            request = service.checked_funding(
                job_id=body.job_id,
                buyer=state.agent(body.buyer),
                worker=state.agent(body.worker),
                asset=body.asset,
                amount=parse_amount(body.amount, decimals),
                fee_bps=state.settings.escrow.default_fee_bps if fee_bps is None else fee_bps,
                expires_at=in_future(body.expires_at, "expires_at"),
                actor=f"apikey:{prefix}",
            )
        except (_Unsure, EscrowdError):
            # FastAPI words it; before the operation, a stored answer for this key would
            # win over an error.
            return await self._handed_on(scope, caller)
        canonical = canonical_json(body.model_dump(mode="json"))
        record = self._record(prefix, key, scope["path"], canonical, 201)
        params = service.api_fund_params(self._key_check(caller), record, request)
        return await self._called(
            scope,
            caller,
            (service.PG_API_FUND, params),
            record=record,
            outcome=lambda done, detail, _: service.api_funded(request, done, detail),
        )

    async def _release(self, scope: Scope, job_id: str) -> Response:
        """POST /v1/escrows/{job_id}/release as api.release_escrow answers it."""
        try:
            caller = await self._writer(scope)
        except EscrowdError as exc:
            return error_response(exc)
        try:
            key = _idempotency_key(scope)
        except _Unsure:
            return await self._handed_on(scope, caller)
        record = self._record(caller.prefix, key, scope["path"], "", 200)
        actor = f"apikey:{caller.prefix}"
        params = service.api_release_params(self._key_check(caller), record, job_id, actor)
        return await self._called(
            scope,
            caller,
            (service.PG_API_SETTLE, params),
            record=record,
            outcome=lambda done, detail, amounts: service.api_released(
                job_id, done, detail, amounts
            ),
        )

    @staticmethod
    def _record(
        principal: str, key: str, path: str, canonical: str, status: int
    ) -> tuple[str | int, ...]:
        """The idempotency record's principal, key, method, path, request hash and the
        status a done operation answers with."""
        digest = idempotency.request_hash("POST", path, canonical)
        return (principal, key, "POST", path, digest, status)

    def _key_check(self, caller: ratelimit.KeyRead | apikeys.Principal) -> tuple[Any, ...]:
        """escrowd_api_key_holds' arguments but the scopes: the key a request of this
        process's lease presents must still be as the lease found it; one checked before
        needs nothing."""
        if isinstance(caller, apikeys.Principal) or caller.leased is None:
            return (None,) * 6
        default = self.state.rate_limit
        return (
            caller.prefix,
            caller.candidate,
            caller.leased.limit,
            caller.leased_window_s,
            default.requests,
            default.window_s,
        )

    async def _called(
        self,
        scope: Scope,
        caller: ratelimit.KeyRead | apikeys.Principal,
        call: tuple[str, tuple[Any, ...]],
        *,
        record: tuple[str | int, ...],
        outcome: Callable[[str, str | None, tuple[Any, ...]], None],
    ) -> Response:
        """The idempotent escrow call: one statement (its own transaction), in one round
        trip with the read of the caller's key when the process counts the key itself.
        The statement checks that key as `admitted` does and does nothing when it does not
        hold; the answer is the response it stored, the key's earlier one, or the refusal."""
        statements = [call]
        if isinstance(caller, ratelimit.KeyRead):
            statements.insert(0, (caller.sql, caller.params))
        try:
            # The key read (when there is one) only reads: one transaction with the call.
            results = await statements_rows_async(self.state.engine, statements, reads_first=True)
        except DBAPIError:
            # FastAPI's path runs it again with its retries; the key makes that safe, and
            # answers a key claimed meanwhile by another request.
            return await self._handed_on(scope, caller)
        row = results[-1][0]
        done, detail, body = row[0], row[1], row[2]
        refused: EscrowdError | None = None
        if isinstance(caller, ratelimit.KeyRead):
            try:
                principal, quota = self.state.admitted(caller, results[0])
                self.state.admit(principal, quota, scope, ApiScope.WRITE)
            except EscrowdError as exc:
                refused = exc
        if done == "key_refused":
            if refused is None:
                # The key changed between the two checks (its limit): FastAPI checks it
                # again; nothing was done.
                raise _Unsure
            return error_response(refused)
        # Otherwise the statement found the key as the process did, and what it did stands.
        if done == "stored":
            return self._stored(record, row)
        try:
            outcome(done, detail, row[3:6])
        except EscrowdError as exc:
            return error_response(exc)
        return Response(content=body, status_code=int(record[5]), media_type="application/json")

    @staticmethod
    def _stored(record: tuple[str | int, ...], row: tuple[Any, ...]) -> Response:
        key, digest = str(record[1]), str(record[4])
        try:
            stored = idempotency.stored_response(
                key=key,
                method=row[9],
                path=row[10],
                request_hash=row[6],
                status=row[7],
                body=row[8],
                digest=digest,
            )
        except EscrowdError as exc:
            return error_response(exc)
        return _replayed(stored)
