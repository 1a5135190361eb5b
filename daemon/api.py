"""The HTTP API under /v1: agents, networks, deposits, escrows, withdrawals, audit and
webhooks.

Routes only translate: they parse decimal strings with the asset's decimals, call the
service functions in one transaction and render the result. Requests are checked before a
route runs, by the types of api_schemas (bodies) and api_deps (paths, queries, headers).
Every error is ``{"error": {"type", "message"}}`` with the status of its type
(config/errors.py); a 405 names the allowed methods in ``Allow``.
"""

# No `from __future__ import annotations`: route signatures use local values (page size)
# that FastAPI must see evaluated.
import json
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import ColumnElement, Engine, String, cast, literal, or_, select, true
from sqlalchemy.orm import Session, aliased
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from escrowd.config.errors import EscrowdError
from escrowd.config.settings import Settings
from escrowd.daemon import api_deposit_funding, api_ratelimit, api_subscriptions
from escrowd.daemon.api_deps import (
    AdminKey,
    AgentIdPath,
    AgentQuery,
    ApiState,
    AuditStreamQuery,
    ChainFamilyPath,
    Cursor,
    IdempotencyKeyHeader,
    JobIdPath,
    JobQuery,
    NetworkFilter,
    Outcome,
    ReadKey,
    RowIdPath,
    RowIdQuery,
    WriteKey,
    in_future,
    mutate,
    state_of,
)
from escrowd.daemon.api_fast import FastFront, balances_out, deposit_family
from escrowd.daemon.api_schemas import (
    CONFIGURED,
    AgentCreate,
    AgentOut,
    AuditPage,
    AuditRowOut,
    AuditVerifyOut,
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
    NetworkAsset,
    NetworkOut,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointOut,
    WebhookSecretOut,
    WithdrawalCreate,
    WithdrawalOut,
    WithdrawalPage,
)
from escrowd.daemon.api_webhooks import add_examples, document_webhooks
from escrowd.escrow import audit, events, service, webhooks
from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.deposits import credit_view
from escrowd.escrow.errors import AgentNotFound
from escrowd.escrow.money import format_amount, parse_amount
from escrowd.escrow.payouts import PlatformAddresses, minimum_payout
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import (
    Agent,
    Asset,
    AuditLog,
    DeliveryStatus,
    Deposit,
    DepositAddress,
    DepositStatus,
    Escrow,
    Payout,
    PayoutStatus,
    WebhookDelivery,
    WebhookEndpoint,
)
from escrowd.wallets.allocation import AddressDeriver, allocate_deposit_address

log = structlog.get_logger(__name__)

API_PREFIX = "/v1"
DEFAULT_PAGE_SIZE = 50
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut} for status in (400, 401, 403, 404, 409, 422, 429, 503)
}

_STATUS_TYPES = {
    400: "validation_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    422: "validation_error",
    429: "rate_limited",
}


DESCRIPTION = f"""Deposits, balances, escrow, withdrawals, audit and webhooks.

**Words.** A *chain family* is an address format: `evm` or `solana`; deposit addresses
are per family, and one EVM address receives on every configured EVM network. A
*network* is one configured chain (`base`, `ethereum`, `solana`): deposits, withdrawals
and their filters name networks (GET /v1/networks lists them). `chain` in requests and
responses is the old name of these fields; it still works and is deprecated.

**Webhooks.** Events are `{{"type", "api_version", "data"}}`, described below under
`webhooks`, each with an example; this version is `{events.API_VERSION}`. A version
changes only when a field is removed or changes meaning; new fields may appear at any
time, so ignore fields you do not know. Every delivery carries Standard Webhooks headers
(`webhook-id`, `webhook-timestamp`, `webhook-signature`) and `Escrowd-Signature`.
"""


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


def _address_out(state: ApiState, agent: Agent, row: DepositAddress) -> DepositAddressOut:
    family: Literal["evm", "solana"] = "evm" if row.chain == "evm" else "solana"
    return DepositAddressOut(
        agent_id=agent.external_id,
        chain_family=family,
        chain=family,
        networks=state.networks_of(family),
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
        "/agents/{agent_id}/deposit-addresses/{chain_family}",
        status_code=201,
        response_model=DepositAddressOut,
        tags=["agents"],
    )
    def create_deposit_address(
        request: Request,
        agent_id: AgentIdPath,
        chain_family: ChainFamilyPath,
        principal: WriteKey,
        key: IdempotencyKeyHeader,
    ) -> Response:
        """The agent's deposit address for a chain family, allocated on first call. One
        address receives on every configured network of the family (`networks`)."""
        state = state_of(request)
        deriver = state.deriver(chain_family)

        def work(s: Session) -> Outcome:
            agent = service.get_agent(s, agent_id)
            row = allocate_deposit_address(s, agent.id, chain_family, deriver)
            return 201, _address_out(state, agent, row).model_dump(mode="json")

        return mutate(request, principal, key, None, work)

    @router.get(
        "/agents/{agent_id}/deposit-addresses/{chain_family}",
        response_model=DepositAddressOut,
        tags=["agents"],
    )
    def get_deposit_address(
        request: Request, agent_id: AgentIdPath, chain_family: ChainFamilyPath, _: ReadKey
    ) -> DepositAddressOut:
        state = state_of(request)

        def work(s: Session) -> DepositAddressOut:
            agent = service.get_agent(s, agent_id)
            row = s.scalars(
                select(DepositAddress).where(
                    DepositAddress.agent_id == agent.id, DepositAddress.chain == chain_family
                )
            ).one_or_none()
            if row is None:
                raise AgentNotFound(
                    f"agent {agent_id!r} has no {chain_family} deposit address yet; "
                    "create it with POST"
                )
            return _address_out(state, agent, row)

        result: DepositAddressOut = state.read(work)
        return result

    @router.get("/agents/{agent_id}/balances", response_model=BalancesOut, tags=["agents"])
    def get_balances(request: Request, agent_id: AgentIdPath, _: ReadKey) -> BalancesOut:
        # On PostgreSQL the fast front (api_fast) answers this route before FastAPI does.
        def work(s: Session) -> BalancesOut:
            agent = service.get_agent(s, agent_id)
            return balances_out(agent.external_id, service.balances(s, agent))

        result: BalancesOut = state_of(request).read(work)
        return result


def _external_ids(s: Session, agent_ids: set[int | None]) -> dict[int, str]:
    wanted = {agent_id for agent_id in agent_ids if agent_id is not None}
    if not wanted:
        return {}
    return dict(s.execute(select(Agent.id, Agent.external_id).where(Agent.id.in_(wanted))).all())


def _deposit_routes(router: APIRouter, page_max: int) -> None:
    @router.get("/deposits", response_model=DepositPage, tags=["deposits"])
    def list_deposits(
        *,
        request: Request,
        _: ReadKey,
        agent: AgentQuery = None,
        network: NetworkFilter,
        status: DepositStatus | None = None,
        cursor: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=page_max)] = DEFAULT_PAGE_SIZE,
    ) -> DepositPage:
        """Deposits oldest first; filter by agent, network and status."""
        state = state_of(request)

        def work(s: Session) -> DepositPage:
            owner = service.get_agent(s, agent) if agent is not None else None
            rows = service.list_deposits(
                s, agent=owner, chain=network, status=status, after_id=cursor, limit=limit
            )
            names = _external_ids(s, {row.agent_id for row in rows})
            items = []
            for row in rows:
                asset = s.get_one(Asset, row.asset_id)
                credit = credit_view(row)
                items.append(
                    DepositOut(
                        id=row.id,
                        agent_id=names[row.agent_id],
                        network=row.chain,
                        chain=row.chain,
                        chain_family=deposit_family(state, row.chain),
                        asset=asset.symbol,
                        amount=format_amount(row.amount, asset.decimals),
                        amount_base_units=str(row.amount),
                        tx_hash=row.tx_hash,
                        log_index=row.log_index,
                        block_number=row.block_number,
                        status=row.status,
                        credited=row.credited,
                        credit_state=credit.state,
                        credited_base_units=str(credit.credited_base_units),
                        reversal_shortfall_base_units=str(credit.reversal_shortfall_base_units),
                        dust_base_units=str(credit.dust_base_units),
                        credit_note=credit.note,
                        created_at=row.created_at,
                    )
                )
            next_cursor = rows[-1].id if len(rows) == limit else None
            return DepositPage(data=items, next_cursor=next_cursor)

        result: DepositPage = state.read(work)
        return result


def _escrow_routes(router: APIRouter) -> None:
    @router.post("/escrows", status_code=201, response_model=EscrowOut, tags=["escrows"])
    def create_escrow(
        request: Request, body: EscrowCreate, principal: WriteKey, key: IdempotencyKeyHeader
    ) -> Response:
        """Fund an escrow for a job: the buyer's available balance moves into it."""
        state = state_of(request)
        settings = state.settings

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
                expires_at=in_future(body.expires_at, "expires_at"),
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


def _withdrawal_out(
    state: ApiState, s: Session, payout: Payout, agent: str, scanned: Mapping[str, int]
) -> WithdrawalOut:
    asset = s.get_one(Asset, payout.asset_id)
    decimals = service.asset_decimals(s, asset.symbol)
    family = deposit_family(state, payout.chain)
    head = scanned.get(payout.chain)
    confirmations = None
    if family == "evm" and payout.block_number is not None and head is not None:
        confirmations = max(0, head - payout.block_number + 1)
    return WithdrawalOut(
        id=payout.id,
        agent_id=agent,
        network=payout.chain,
        chain=payout.chain,
        chain_family=family,
        asset=asset.symbol,
        destination=payout.destination,
        amount=format_amount(payout.amount, decimals),
        amount_base_units=str(payout.amount),
        status=payout.status,
        reason=payout.reason,
        tx_hash=payout.tx_hash,
        block_number=payout.block_number,
        confirmations=confirmations,
        failure_reason=payout.error,
        created_at=payout.created_at,
        updated_at=payout.updated_at,
        broadcast_at=payout.broadcast_at,
        confirmed_at=payout.confirmed_at,
    )


def _withdrawals_out(state: ApiState, s: Session, payouts: Sequence[Payout]) -> list[WithdrawalOut]:
    names = _external_ids(s, {payout.agent_id for payout in payouts})
    evm = sorted({p.chain for p in payouts if deposit_family(state, p.chain) == "evm"})
    scanned = service.scanned_blocks(s, evm)
    return [
        _withdrawal_out(state, s, payout, names.get(payout.agent_id or 0, ""), scanned)
        for payout in payouts
    ]


def _withdrawal_routes(router: APIRouter, page_max: int) -> None:
    @router.post(
        "/withdrawals", status_code=201, response_model=WithdrawalOut, tags=["withdrawals"]
    )
    def create_withdrawal(
        request: Request, body: WithdrawalCreate, principal: WriteKey, key: IdempotencyKeyHeader
    ) -> Response:
        """Hold an agent's balance for an on-chain payout to `to_address` on `network`."""
        state = state_of(request)
        settings = state.settings
        network = body.network_name
        family = state.family(network)
        platform = state.platform_addresses()

        def work(s: Session) -> Outcome:
            agent = service.get_agent(s, body.agent_id)
            decimals = service.asset_decimals(s, body.asset)
            payout: Payout = service.withdraw(
                s,
                agent=agent,
                asset=body.asset,
                chain=network,
                family=family,
                to_address=body.to_address,
                amount=parse_amount(body.amount, decimals),
                idempotency_key=f"{principal.prefix}:{key}",
                min_amount_base_units=minimum_payout(settings, body.asset),
                platform=platform,
            )
            out = _withdrawal_out(state, s, payout, agent.external_id, {})
            return 201, out.model_dump(mode="json")

        return mutate(request, principal, key, body, work)

    @router.get("/withdrawals", response_model=WithdrawalPage, tags=["withdrawals"])
    def list_withdrawals(
        *,
        request: Request,
        _: ReadKey,
        agent: AgentQuery = None,
        network: NetworkFilter,
        status: PayoutStatus | None = None,
        cursor: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=page_max)] = DEFAULT_PAGE_SIZE,
    ) -> WithdrawalPage:
        """Payouts to agents oldest first (withdrawals, and escrow payouts sent on chain);
        filter by agent, network and status."""
        state = state_of(request)

        def work(s: Session) -> WithdrawalPage:
            owner = service.get_agent(s, agent) if agent is not None else None
            rows = service.list_withdrawals(
                s, agent=owner, network=network, status=status, after_id=cursor, limit=limit
            )
            next_cursor = rows[-1].id if len(rows) == limit else None
            return WithdrawalPage(data=_withdrawals_out(state, s, rows), next_cursor=next_cursor)

        result: WithdrawalPage = state.read(work)
        return result

    @router.get("/withdrawals/{withdrawal_id}", response_model=WithdrawalOut, tags=["withdrawals"])
    def get_withdrawal(request: Request, withdrawal_id: RowIdPath, _: ReadKey) -> WithdrawalOut:
        """One payout by the id POST /v1/withdrawals and payout.* events give."""
        state = state_of(request)
        result: WithdrawalOut = state.read(
            lambda s: _withdrawals_out(state, s, [service.get_withdrawal(s, withdrawal_id)])[0]
        )
        return result


def _network_routes(router: APIRouter) -> None:
    @router.get("/networks", response_model=list[NetworkOut], tags=["networks"])
    def list_networks(request: Request, _: ReadKey) -> list[NetworkOut]:
        """The configured networks: the values ?network= and a withdrawal's network take."""
        state = state_of(request)
        settings = state.settings

        def work(s: Session) -> list[NetworkOut]:
            assets: dict[str, list[NetworkAsset]] = {}
            for row in s.scalars(select(Asset).order_by(Asset.chain, Asset.symbol)):
                assets.setdefault(row.chain, []).append(
                    NetworkAsset(
                        asset=row.symbol, decimals=row.decimals, token_address=row.token_address
                    )
                )
            out = [
                NetworkOut(
                    network=chain.name,
                    chain_family="evm",
                    chain_id=chain.chain_id,
                    confirmations=chain.confirmations,
                    assets=assets.get(chain.name, []),
                )
                for chain in settings.evm_chains
            ]
            if settings.solana is not None:
                name = settings.solana.name
                out.append(
                    NetworkOut(
                        network=name,
                        chain_family="solana",
                        chain_id=None,
                        confirmations=None,
                        assets=assets.get(name, []),
                    )
                )
            return out

        result: list[NetworkOut] = state.read(work)
        return result


def _audit_streams_of_agent(agent_id: int) -> Any:
    """Audit streams that concern an agent: its escrows, deposits and payouts."""
    escrows = select((literal("escrow:") + Escrow.job_id).label("stream")).where(
        or_(Escrow.buyer_agent_id == agent_id, Escrow.worker_agent_id == agent_id)
    )
    deposits = select(
        literal("deposit:") + Deposit.chain + literal(":") + cast(Deposit.id, String)
    ).where(Deposit.agent_id == agent_id)
    payouts = select(literal("payout:") + cast(Payout.id, String)).where(
        Payout.agent_id == agent_id
    )
    return escrows.union_all(deposits, payouts)


def _audit_rows_of_agent(
    session: Session, agent_id: int, conditions: list[ColumnElement[bool]], limit: int
) -> Sequence[AuditLog]:
    """The first `limit` audit rows by id of the agent's streams that meet `conditions`."""
    streams = _audit_streams_of_agent(agent_id).subquery()
    if session.get_bind().dialect.name != "postgresql":
        query = select(AuditLog).where(AuditLog.stream.in_(select(streams.c.stream)))
        return session.scalars(query.where(*conditions).order_by(AuditLog.id).limit(limit)).all()
    # Stream by stream through uq_audit_log_stream_seq, each one's first rows: given the
    # streams as a set, PostgreSQL walked the primary key past everyone's history.
    per_stream = (
        select(AuditLog)
        .where(AuditLog.stream == streams.c.stream, *conditions)
        .order_by(AuditLog.id)
        .limit(limit)
        .lateral()
    )
    rows = aliased(AuditLog, per_stream)
    query = select(rows).select_from(streams).join(per_stream, true())
    return session.scalars(query.order_by(rows.id).limit(limit)).all()


def _audit_routes(router: APIRouter, page_max: int) -> None:
    @router.get("/audit", response_model=AuditPage, tags=["audit"])
    def list_audit(
        *,
        request: Request,
        _: ReadKey,
        stream: AuditStreamQuery = None,
        escrow: JobQuery = None,
        agent: AgentQuery = None,
        cursor: Cursor = None,
        limit: Annotated[int, Query(ge=1, le=page_max)] = DEFAULT_PAGE_SIZE,
    ) -> AuditPage:
        """Audit rows oldest first: of one stream, one escrow (by job id), one agent, or
        every stream; filters given together must all hold."""

        def work(s: Session) -> AuditPage:
            conditions: list[ColumnElement[bool]] = []
            if stream is not None:
                conditions.append(AuditLog.stream == stream)
            if escrow is not None:
                conditions.append(AuditLog.stream == f"escrow:{escrow}")
            if cursor is not None:
                conditions.append(AuditLog.id > cursor)
            if agent is not None:
                owner = service.get_agent(s, agent)
                rows = _audit_rows_of_agent(s, owner.id, conditions, limit)
            else:
                query = select(AuditLog).where(*conditions).order_by(AuditLog.id).limit(limit)
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
    def delete_endpoint(request: Request, endpoint_id: RowIdPath, _: AdminKey) -> dict[str, Any]:
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
        endpoint_id: RowIdPath,
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
        endpoint_id: RowIdQuery = None,
        status: DeliveryStatus | None = None,
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
        delivery_id: RowIdPath,
        principal: AdminKey,
        key: IdempotencyKeyHeader,
    ) -> Response:
        def work(s: Session) -> Outcome:
            delivery = webhooks.redeliver(s, delivery_id)
            return 200, _delivery_out(delivery).model_dump(mode="json")

        return mutate(request, principal, key, None, work)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves on this path. Starlette's own 405 names only the
    methods of the first route whose path matched, and GET and POST of one path are two
    routes here."""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in app.router.routes
        )
    ]


def _fill_configured(node: Any, values: Mapping[str, list[str]]) -> None:
    """Replace each CONFIGURED marker in an OpenAPI document with the configured values
    as an enum (left as a plain pattern when none are configured)."""
    if isinstance(node, dict):
        kind = node.pop(CONFIGURED, None)
        if kind is not None and values.get(kind):
            node["enum"] = values[kind]
        for child in node.values():
            _fill_configured(child, values)
    elif isinstance(node, list):
        for child in node:
            _fill_configured(child, values)


def _extend_openapi(app: FastAPI, state: ApiState) -> None:
    """/openapi.json lists the configured networks and assets where a request takes one,
    and an example of every webhook event."""
    settings = state.settings
    assets = sorted({"USDC"} | ({"SOL"} if settings.solana is not None else set()))
    values = {"networks": list(state.networks), "assets": assets if state.networks else []}
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            _fill_configured(document, values)
            add_examples(document)
            api_ratelimit.document(document)
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


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
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _STATUS_TYPES.get(exc.status_code, "http_error")
        response = _error(exc.status_code, type_, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return response

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
    fast_front: bool = True,
) -> FastAPI:
    """The API app. `deriver`: the deposit address deriver(s) of the unlocked keystore,
    one AddressDeriver or a mapping chain family -> deriver; None answers the deposit
    address POST with 503. `webhook_cipher` defaults to the key file from settings.
    `platform`: the keystore's own wallets, never a withdrawal destination; None answers
    the withdrawal POST with 503. `fast_front`: on PostgreSQL, answer the hot routes in
    api_fast ahead of FastAPI (off only to compare the two)."""
    if deriver is None:
        derivers: Mapping[str, AddressDeriver] = {}
    elif isinstance(deriver, Mapping):
        derivers = dict(deriver)
    else:
        derivers = {deriver.chain: deriver}
    # No OpenTelemetry here (metrics are Prometheus's, /metrics): with it on, FastAPI
    # asked the global providers whether anyone listens at every request (~20 us).
    app = FastAPI(
        title="escrowd",
        version="1",
        description=DESCRIPTION,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    state = ApiState(
        settings=settings,
        engine=engine,
        derivers=derivers,
        cipher=webhook_cipher,
        platform=platform,
    )
    app.state.escrowd = state
    page_max = settings.api.page_size_max
    router = APIRouter(prefix=API_PREFIX, responses=ERROR_RESPONSES)
    _agents_routes(router)
    _network_routes(router)
    _deposit_routes(router, page_max)
    _escrow_routes(router)
    _withdrawal_routes(router, page_max)
    _audit_routes(router, page_max)
    _webhook_routes(router, page_max)
    api_subscriptions.install(router, page_max)
    api_deposit_funding.install(router, _escrow_out)
    app.include_router(router)
    document_webhooks(app)
    _extend_openapi(app, state)
    _install_error_handlers(app)
    if fast_front and engine.dialect.name == "postgresql":
        app.add_middleware(FastFront, state=state)
    # Added last, so outermost: it writes the quota of the fast front's answers too.
    app.add_middleware(api_ratelimit.RateLimitHeaders)
    return app


__all__ = ["create_app"]
