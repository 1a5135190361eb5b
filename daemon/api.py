"""The HTTP API under /v1: agents, deposits, escrows, withdrawals, audit and webhooks.

Routes only translate: they parse decimal strings with the asset's decimals, call the
service functions in one transaction and render the result. Every error is
``{"error": {"type", "message"}}`` with the status of its type (config/errors.py).
"""

# No `from __future__ import annotations`: route signatures use local values (page size)
# that FastAPI must see evaluated.
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, String, cast, literal, or_, select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from escrowd.config.errors import EscrowdError, ValidationFailed
from escrowd.config.settings import Settings
from escrowd.daemon import api_deposit_funding, api_subscriptions
from escrowd.daemon.api_deps import (
    AdminKey,
    ApiState,
    IdempotencyKeyHeader,
    Outcome,
    ReadKey,
    WriteKey,
    mutate,
    state_of,
)
from escrowd.daemon.api_schemas import (
    AgentCreate,
    AgentOut,
    AuditPage,
    AuditRowOut,
    AuditVerifyOut,
    BalanceOut,
    BalancesOut,
    DeliveryOut,
    DeliveryPage,
    DepositAddressOut,
    DepositOut,
    DepositPage,
    ErrorOut,
    EscrowCreate,
    EscrowOut,
    EscrowResolve,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointOut,
    WebhookSecretOut,
    WithdrawalCreate,
    WithdrawalOut,
)
from escrowd.escrow import audit, service, webhooks
from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.errors import AgentNotFound
from escrowd.escrow.money import format_amount, parse_amount
from escrowd.escrow.payouts import PlatformAddresses, chain_family, minimum_payout
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import (
    Agent,
    Asset,
    AuditLog,
    Deposit,
    DepositAddress,
    Escrow,
    Payout,
    WebhookDelivery,
    WebhookEndpoint,
)
from escrowd.wallets.allocation import AddressDeriver, allocate_deposit_address

log = structlog.get_logger(__name__)

API_PREFIX = "/v1"
DEFAULT_PAGE_SIZE = 50
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut} for status in (400, 401, 403, 404, 409, 422, 503)
}
_STATUS_TYPES = {
    400: "validation_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    422: "validation_error",
}

AgentIdPath = Annotated[str, Path(min_length=1, max_length=128)]
JobIdPath = Annotated[str, Path(min_length=1, max_length=128)]
ChainFamilyPath = Annotated[Literal["evm", "solana"], Path()]
Cursor = Annotated[int | None, Query(ge=1, le=2**62, description="next_cursor of the last page")]


def _error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status)


# --- rendering ----------------------------------------------------------------------------


def _units(value: int | None, decimals: int) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    return format_amount(value, decimals), str(value)


def _agent_out(agent: Agent) -> AgentOut:
    return AgentOut(id=agent.external_id, name=agent.name, created_at=agent.created_at)


def _escrow_out(session: Session, escrow: Escrow, agents: AgentCache) -> EscrowOut:
    decimals = service.asset_decimals(session, escrow.asset)
    worker_amount, worker_units = _units(escrow.worker_amount, decimals)
    fee_amount, fee_units = _units(escrow.fee_amount, decimals)
    refund_amount, refund_units = _units(escrow.refund_amount, decimals)
    parties = [escrow.buyer_agent_id, escrow.worker_agent_id]
    names = {agent_id: agents.external_id(agent_id) for agent_id in parties}
    if None in names.values():
        names = dict(
            session.execute(select(Agent.id, Agent.external_id).where(Agent.id.in_(parties))).all()
        )
    return EscrowOut(
        job_id=escrow.job_id,
        status=escrow.status,
        buyer=names[escrow.buyer_agent_id],
        worker=names[escrow.worker_agent_id],
        asset=escrow.asset,
        amount=format_amount(escrow.amount, decimals),
        amount_base_units=str(escrow.amount),
        fee_bps=escrow.fee_bps,
        worker_amount=worker_amount,
        worker_amount_base_units=worker_units,
        fee_amount=fee_amount,
        fee_amount_base_units=fee_units,
        refund_amount=refund_amount,
        refund_amount_base_units=refund_units,
        expires_at=escrow.expires_at,
        resolved_at=escrow.resolved_at,
        created_at=escrow.created_at,
        funded_from_deposit=api_deposit_funding.deposit_out(session, escrow),
    )


def _address_out(agent: Agent, row: DepositAddress) -> DepositAddressOut:
    return DepositAddressOut(
        agent_id=agent.external_id,
        chain=row.chain,
        address=row.address,
        derivation_index=row.derivation_index,
        token_account=row.token_account,
    )


def _endpoint_out(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return WebhookEndpointOut(
        id=endpoint.id,
        url=endpoint.url,
        event_types=webhooks.event_types_of(endpoint),
        enabled=endpoint.enabled,
        disabled_reason=endpoint.disabled_reason,
        created_at=endpoint.created_at,
    ).model_dump(mode="json")


def _delivery_out(delivery: WebhookDelivery) -> DeliveryOut:
    return DeliveryOut(
        id=delivery.id,
        endpoint_id=delivery.endpoint_id,
        event_id=delivery.event_id,
        status=delivery.status,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        delivered_at=delivery.delivered_at,
        created_at=delivery.created_at,
    )


def _parse_share(text: str, decimals: int) -> int:
    """Like parse_amount, but zero is allowed (a dispute may award the worker nothing)."""
    if re.fullmatch(rf"0(\.0{{1,{max(decimals, 1)}}})?", text):
        return 0
    return parse_amount(text, decimals, field="worker_amount")


def _redact_secret(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "secret": None}


# --- routes -------------------------------------------------------------------------------


def _agents_routes(router: APIRouter) -> None:
    @router.post("/agents", status_code=201, response_model=AgentOut, tags=["agents"])
    def create_agent(
        request: Request, body: AgentCreate, principal: WriteKey, key: IdempotencyKeyHeader
    ) -> Response:
        """Register an agent by the marketplace's id (idempotent on that id)."""

        def work(s: Session) -> Outcome:
            agent = service.register_agent(s, body.id, body.name)
            return 201, _agent_out(agent).model_dump(mode="json")

        return mutate(request, principal, key, body, work)

    @router.get("/agents/{agent_id}", response_model=AgentOut, tags=["agents"])
    def get_agent(request: Request, agent_id: AgentIdPath, _: ReadKey) -> AgentOut:
        agent: Agent = state_of(request).read(lambda s: service.get_agent(s, agent_id))
        return _agent_out(agent)

    @router.post(
        "/agents/{agent_id}/deposit-addresses/{chain}",
        status_code=201,
        response_model=DepositAddressOut,
        tags=["agents"],
    )
    def create_deposit_address(
        request: Request,
        agent_id: AgentIdPath,
        chain: ChainFamilyPath,
        principal: WriteKey,
        key: IdempotencyKeyHeader,
    ) -> Response:
        """The agent's deposit address on a chain family, allocated on first call."""
        deriver = state_of(request).deriver(chain)

        def work(s: Session) -> Outcome:
            agent = service.get_agent(s, agent_id)
            row = allocate_deposit_address(s, agent.id, chain, deriver)
            return 201, _address_out(agent, row).model_dump(mode="json")

        return mutate(request, principal, key, None, work)

    @router.get(
        "/agents/{agent_id}/deposit-addresses/{chain}",
        response_model=DepositAddressOut,
        tags=["agents"],
    )
    def get_deposit_address(
        request: Request, agent_id: AgentIdPath, chain: ChainFamilyPath, _: ReadKey
    ) -> DepositAddressOut:
        def work(s: Session) -> DepositAddressOut:
            agent = service.get_agent(s, agent_id)
            row = s.scalars(
                select(DepositAddress).where(
                    DepositAddress.agent_id == agent.id, DepositAddress.chain == chain
                )
            ).one_or_none()
            if row is None:
                raise AgentNotFound(
                    f"agent {agent_id!r} has no {chain} deposit address yet; create it with POST"
                )
            return _address_out(agent, row)

        result: DepositAddressOut = state_of(request).read(work)
        return result

    @router.get("/agents/{agent_id}/balances", response_model=BalancesOut, tags=["agents"])
    def get_balances(request: Request, agent_id: AgentIdPath, _: ReadKey) -> BalancesOut:
        def work(s: Session) -> BalancesOut:
            agent = service.get_agent(s, agent_id)
            rows = [
                BalanceOut(
                    asset=b.asset,
                    decimals=b.decimals,
                    available=format_amount(b.available, b.decimals),
                    available_base_units=str(b.available),
                    escrowed_as_buyer=format_amount(b.escrowed_as_buyer, b.decimals),
                    escrowed_as_buyer_base_units=str(b.escrowed_as_buyer),
                )
                for b in service.balances(s, agent)
            ]
            return BalancesOut(agent_id=agent.external_id, balances=rows)

        result: BalancesOut = state_of(request).read(work)
        return result


def _deposit_routes(router: APIRouter, page_max: int) -> None:
    @router.get("/deposits", response_model=DepositPage, tags=["deposits"])
    def list_deposits(
        *,
        request: Request,
        _: ReadKey,
        agent: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
        chain: Annotated[str | None, Query(min_length=1, max_length=32)] = None,
        status: Literal["pending", "confirmed", "orphaned"] | None = None,
        cursor: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=page_max)] = DEFAULT_PAGE_SIZE,
    ) -> DepositPage:
        def work(s: Session) -> DepositPage:
            owner = service.get_agent(s, agent) if agent is not None else None
            rows = service.list_deposits(
                s, agent=owner, chain=chain, status=status, after_id=cursor, limit=limit
            )
            items = []
            for row in rows:
                asset = s.get_one(Asset, row.asset_id)
                items.append(
                    DepositOut(
                        id=row.id,
                        agent_id=s.get_one(Agent, row.agent_id).external_id,
                        chain=row.chain,
                        asset=asset.symbol,
                        amount=format_amount(row.amount, asset.decimals),
                        amount_base_units=str(row.amount),
                        tx_hash=row.tx_hash,
                        log_index=row.log_index,
                        block_number=row.block_number,
                        status=row.status,
                        credited=row.credited,
                        created_at=row.created_at,
                    )
                )
            next_cursor = rows[-1].id if len(rows) == limit else None
            return DepositPage(data=items, next_cursor=next_cursor)

        result: DepositPage = state_of(request).read(work)
        return result


def _escrow_routes(router: APIRouter) -> None:
    @router.post("/escrows", status_code=201, response_model=EscrowOut, tags=["escrows"])
    def create_escrow(
        request: Request, body: EscrowCreate, principal: WriteKey, key: IdempotencyKeyHeader
    ) -> Response:
        """Fund an escrow for a job: the buyer's available balance moves into it."""
        state = state_of(request)
        settings = state.settings
        if body.expires_at is not None and body.expires_at.tzinfo is None:
            raise ValidationFailed("expires_at needs a timezone, e.g. 2026-12-01T00:00:00Z")

        def work(s: Session) -> Outcome:
            decimals = service.asset_decimals(s, body.asset)
            escrow = service.fund_escrow(
                s,
                job_id=body.job_id,
                buyer=state.agent(body.buyer),
                worker=state.agent(body.worker),
                asset=body.asset,
                amount=parse_amount(body.amount, decimals),
                fee_bps=(settings.escrow.default_fee_bps if body.fee_bps is None else body.fee_bps),
                expires_at=body.expires_at,
                actor=f"apikey:{principal.prefix}",
            )
            return 201, _escrow_out(s, escrow, state.agents).model_dump(mode="json")

        return mutate(request, principal, key, body, work)

    @router.get("/escrows/{job_id}", response_model=EscrowOut, tags=["escrows"])
    def get_escrow(request: Request, job_id: JobIdPath, _: ReadKey) -> EscrowOut:
        state = state_of(request)
        result: EscrowOut = state.read(
            lambda s: _escrow_out(s, service.get_escrow(s, job_id), state.agents)
        )
        return result

    @router.post("/escrows/{job_id}/release", response_model=EscrowOut, tags=["escrows"])
    def release_escrow(
        request: Request, job_id: JobIdPath, principal: WriteKey, key: IdempotencyKeyHeader
    ) -> Response:
        """Pay the worker amount - fee (fee = floor(amount * fee_bps / 10000))."""

        agents = state_of(request).agents

        def work(s: Session) -> Outcome:
            escrow = service.release_escrow(s, job_id, actor=f"apikey:{principal.prefix}")
            return 200, _escrow_out(s, escrow, agents).model_dump(mode="json")

        return mutate(request, principal, key, None, work)

    @router.post("/escrows/{job_id}/refund", response_model=EscrowOut, tags=["escrows"])
    def refund_escrow(
        request: Request, job_id: JobIdPath, principal: WriteKey, key: IdempotencyKeyHeader
    ) -> Response:
        """Return the whole amount to the buyer."""

        agents = state_of(request).agents

        def work(s: Session) -> Outcome:
            escrow = service.refund_escrow(s, job_id, actor=f"apikey:{principal.prefix}")
            return 200, _escrow_out(s, escrow, agents).model_dump(mode="json")

        return mutate(request, principal, key, None, work)

    @router.post("/escrows/{job_id}/resolve", response_model=EscrowOut, tags=["escrows"])
    def resolve_escrow(
        request: Request,
        job_id: JobIdPath,
        body: EscrowResolve,
        principal: WriteKey,
        key: IdempotencyKeyHeader,
    ) -> Response:
        """Split a disputed escrow between worker and buyer."""
        agents = state_of(request).agents

        def work(s: Session) -> Outcome:
            escrow = service.get_escrow(s, job_id)
            share = _parse_share(body.worker_amount, service.asset_decimals(s, escrow.asset))
            escrow = service.resolve_escrow(s, job_id, share, actor=f"apikey:{principal.prefix}")
            return 200, _escrow_out(s, escrow, agents).model_dump(mode="json")

        return mutate(request, principal, key, body, work)


def _withdrawal_routes(router: APIRouter) -> None:
    @router.post(
        "/withdrawals", status_code=201, response_model=WithdrawalOut, tags=["withdrawals"]
    )
    def create_withdrawal(
        request: Request, body: WithdrawalCreate, principal: WriteKey, key: IdempotencyKeyHeader
    ) -> Response:
        """Hold an agent's balance for an on-chain payout to `to_address`."""
        state = state_of(request)
        settings = state.settings
        family = chain_family(settings, body.chain)
        platform = state.platform_addresses()
        checked_key = key or ""

        def work(s: Session) -> Outcome:
            agent = service.get_agent(s, body.agent_id)
            decimals = service.asset_decimals(s, body.asset)
            payout: Payout = service.withdraw(
                s,
                agent=agent,
                asset=body.asset,
                chain=body.chain,
                family=family,
                to_address=body.to_address,
                amount=parse_amount(body.amount, decimals),
                idempotency_key=f"{principal.prefix}:{checked_key}",
                min_amount_base_units=minimum_payout(settings, body.asset),
                platform=platform,
            )
            out = WithdrawalOut(
                id=payout.id,
                agent_id=agent.external_id,
                chain=payout.chain,
                asset=body.asset,
                destination=payout.destination,
                amount=format_amount(payout.amount, decimals),
                amount_base_units=str(payout.amount),
                status=payout.status,
                created_at=payout.created_at,
            )
            return 201, out.model_dump(mode="json")

        return mutate(request, principal, key, body, work)


def _audit_streams_of_agent(agent_id: int) -> Any:
    """Audit streams that concern an agent: its escrows, deposits and payouts."""
    escrows = select(literal("escrow:") + Escrow.job_id).where(
        or_(Escrow.buyer_agent_id == agent_id, Escrow.worker_agent_id == agent_id)
    )
    deposits = select(
        literal("deposit:") + Deposit.chain + literal(":") + cast(Deposit.id, String)
    ).where(Deposit.agent_id == agent_id)
    payouts = select(literal("payout:") + cast(Payout.id, String)).where(
        Payout.agent_id == agent_id
    )
    return escrows.union_all(deposits, payouts)


def _audit_routes(router: APIRouter, page_max: int) -> None:
    @router.get("/audit", response_model=AuditPage, tags=["audit"])
    def list_audit(
        *,
        request: Request,
        _: ReadKey,
        stream: Annotated[str | None, Query(min_length=1, max_length=160)] = None,
        escrow: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
        agent: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
        cursor: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=page_max)] = DEFAULT_PAGE_SIZE,
    ) -> AuditPage:
        """Audit rows of one stream, one escrow (by job id) or one agent, oldest first."""
        if sum(value is not None for value in (stream, escrow, agent)) != 1:
            raise ValidationFailed("give exactly one of ?stream=, ?escrow= or ?agent=")

        def work(s: Session) -> AuditPage:
            query = select(AuditLog).order_by(AuditLog.id).limit(limit)
            if stream is not None:
                query = query.where(AuditLog.stream == stream)
            elif escrow is not None:
                query = query.where(AuditLog.stream == f"escrow:{escrow}")
            else:
                assert agent is not None
                owner = service.get_agent(s, agent)
                query = query.where(AuditLog.stream.in_(_audit_streams_of_agent(owner.id)))
            if cursor is not None:
                query = query.where(AuditLog.id > cursor)
            rows = s.scalars(query).all()
            items = [
                AuditRowOut(
                    id=row.id,
                    stream=row.stream,
                    seq=row.seq,
                    actor=row.actor,
                    action=row.action,
                    asset=row.asset,
                    amount_base_units=None if row.amount is None else str(row.amount),
                    details=json.loads(row.details),
                    created_at=row.created_at,
                    row_hash=row.row_hash,
                )
                for row in rows
            ]
            return AuditPage(data=items, next_cursor=rows[-1].id if len(rows) == limit else None)

        result: AuditPage = state_of(request).read(work)
        return result

    @router.post("/audit/verify", response_model=AuditVerifyOut, tags=["audit"])
    def verify_audit(request: Request, _: AdminKey) -> AuditVerifyOut:
        """Recompute every hash chain and checkpoint (read-only; no idempotency key needed)."""
        report: audit.AuditReport = state_of(request).read(audit.verify)
        return AuditVerifyOut(
            ok=report.ok,
            rows_checked=report.rows_checked,
            streams_checked=report.streams_checked,
            first_problem=report.first_problem,
        )


def _webhook_routes(router: APIRouter, page_max: int) -> None:
    @router.post(
        "/webhook-endpoints",
        status_code=201,
        response_model=WebhookEndpointCreated,
        tags=["webhooks"],
    )
    def create_endpoint(
        request: Request,
        body: WebhookEndpointCreate,
        principal: AdminKey,
        key: IdempotencyKeyHeader,
    ) -> Response:
        """Register an endpoint; the signing secret is in this response only."""
        cipher = state_of(request).webhook_cipher()

        def work(s: Session) -> Outcome:
            endpoint, secret = webhooks.create_endpoint(s, cipher, body.url, body.event_types)
            return 201, {**_endpoint_out(endpoint), "secret": secret}

        return mutate(request, principal, key, body, work, redact=_redact_secret)

    @router.get("/webhook-endpoints", response_model=list[WebhookEndpointOut], tags=["webhooks"])
    def list_endpoints(request: Request, _: AdminKey) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = state_of(request).read(
            lambda s: [_endpoint_out(e) for e in webhooks.list_endpoints(s)]
        )
        return result

    @router.delete(
        "/webhook-endpoints/{endpoint_id}", response_model=WebhookEndpointOut, tags=["webhooks"]
    )
    def delete_endpoint(
        request: Request, endpoint_id: Annotated[int, Path(ge=1, le=2**62)], _: AdminKey
    ) -> dict[str, Any]:
        """Stop sending to an endpoint; its queued deliveries are marked failed."""
        state = state_of(request)
        with state.writers() as s, s.begin():
            return _endpoint_out(webhooks.delete_endpoint(s, endpoint_id))

    @router.post(
        "/webhook-endpoints/{endpoint_id}/rotate-secret",
        response_model=WebhookSecretOut,
        tags=["webhooks"],
    )
    def rotate_secret(
        request: Request,
        endpoint_id: Annotated[int, Path(ge=1, le=2**62)],
        principal: AdminKey,
        key: IdempotencyKeyHeader,
    ) -> Response:
        cipher = state_of(request).webhook_cipher()

        def work(s: Session) -> Outcome:
            secret = webhooks.rotate_secret(s, cipher, endpoint_id)
            return 200, {"endpoint_id": endpoint_id, "secret": secret}

        return mutate(request, principal, key, None, work, redact=_redact_secret)

    @router.get("/webhook-deliveries", response_model=DeliveryPage, tags=["webhooks"])
    def list_deliveries(
        *,
        request: Request,
        _: AdminKey,
        endpoint_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
        status: Literal["pending", "delivered", "failed"] | None = None,
        cursor: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=page_max)] = DEFAULT_PAGE_SIZE,
    ) -> DeliveryPage:
        """Deliveries newest first; pass next_cursor as ?cursor= for older ones."""
        page: webhooks.DeliveryPage = state_of(request).read(
            lambda s: webhooks.list_deliveries(s, endpoint_id, status, cursor, limit)
        )
        return DeliveryPage(
            data=[_delivery_out(d) for d in page.items], next_cursor=page.next_cursor
        )

    @router.post(
        "/webhook-deliveries/{delivery_id}/redeliver",
        response_model=DeliveryOut,
        tags=["webhooks"],
    )
    def redeliver(
        request: Request,
        delivery_id: Annotated[int, Path(ge=1, le=2**62)],
        principal: AdminKey,
        key: IdempotencyKeyHeader,
    ) -> Response:
        def work(s: Session) -> Outcome:
            delivery = webhooks.redeliver(s, delivery_id)
            return 200, _delivery_out(delivery).model_dump(mode="json")

        return mutate(request, principal, key, None, work)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EscrowdError)
    async def escrowd_error(_: Request, exc: EscrowdError) -> JSONResponse:
        return _error(exc.http_status, exc.type, exc.message)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for item in exc.errors()[:5]:
            where = ".".join(str(part) for part in item.get("loc", ()))
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        return _error(400, "validation_error", "invalid request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _STATUS_TYPES.get(exc.status_code, "http_error")
        return _error(exc.status_code, type_, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "api_unhandled_error",
            method=request.method,
            path=request.url.path,
            error=type(exc).__name__,
        )
        return _error(500, "internal_error", "internal error; the request may be retried")


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    deriver: AddressDeriver | Mapping[str, AddressDeriver] | None = None,
    webhook_cipher: SecretCipher | None = None,
    platform: PlatformAddresses | None = None,
) -> FastAPI:
    """The API app. `deriver`: the deposit address deriver(s) of the unlocked keystore,
    one AddressDeriver or a mapping chain family -> deriver; None answers the deposit
    address POST with 503. `webhook_cipher` defaults to the key file from settings.
    `platform`: the keystore's own wallets, never a withdrawal destination; None answers
    the withdrawal POST with 503."""
    if deriver is None:
        derivers: Mapping[str, AddressDeriver] = {}
    elif isinstance(deriver, Mapping):
        derivers = dict(deriver)
    else:
        derivers = {deriver.chain: deriver}
    app = FastAPI(
        title="escrowd",
        version="1",
        description="Deposits, balances, escrow, withdrawals, audit and webhooks.",
    )
    app.state.escrowd = ApiState(
        settings=settings,
        engine=engine,
        derivers=derivers,
        cipher=webhook_cipher,
        platform=platform,
    )
    page_max = settings.api.page_size_max
    router = APIRouter(prefix=API_PREFIX, responses=ERROR_RESPONSES)
    _agents_routes(router)
    _deposit_routes(router, page_max)
    _escrow_routes(router)
    _withdrawal_routes(router)
    _audit_routes(router, page_max)
    _webhook_routes(router, page_max)
    api_subscriptions.install(router, page_max)
    api_deposit_funding.install(router, _escrow_out)
    app.include_router(router)
    _install_error_handlers(app)
    return app


__all__ = ["create_app"]
