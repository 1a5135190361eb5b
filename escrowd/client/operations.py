"""Every operation of the HTTP API /v1 as a `Call`: path, body and how to read the answer.

The sync and the async client both send these; a new endpoint is one function here and
one short method in each client. Amounts go out as decimal strings in the asset's units
("12.5"), as the API takes them; a Decimal is written out exactly, and a number of any
other type is refused, since 12 could mean 12 USDC or 12 base units.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from escrowd.client import values
from escrowd.client.calls import Call
from escrowd.client.errors import InvalidAmount
from escrowd.client.values import (
    AuditReport,
    AuditRow,
    Deposit,
    DepositAddress,
    Page,
    WebhookDelivery,
    WebhookEndpoint,
)
from escrowd.escrow.values import Agent, Balance, Escrow, Withdrawal

Amount = str | Decimal


def units(amount: Amount, field: str = "amount") -> str:
    """An amount as the API's decimal string in the asset's units."""
    if isinstance(amount, Decimal) and amount.is_finite():
        return format(amount, "f")
    if isinstance(amount, str):
        return amount
    raise InvalidAmount(
        f'{field} must be a decimal string in the asset\'s units such as "12.5" (or a '
        f"Decimal), got {type(amount).__name__} {amount!r}"
    )


def _seg(value: str | int) -> str:
    return quote(str(value), safe="")


def _present(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _params(**fields: Any) -> dict[str, str | int]:
    return {name: value for name, value in fields.items() if value is not None}


# --- agents -------------------------------------------------------------------------------


def register_agent(agent_id: str, name: str | None = None) -> Call[Agent]:
    return Call("POST", "/v1/agents", values.agent, _present(id=agent_id, name=name), keyed=True)


def get_agent(agent_id: str) -> Call[Agent]:
    return Call("GET", f"/v1/agents/{_seg(agent_id)}", values.agent)


def create_deposit_address(agent_id: str, chain: str) -> Call[DepositAddress]:
    path = f"/v1/agents/{_seg(agent_id)}/deposit-addresses/{_seg(chain)}"
    return Call("POST", path, values.deposit_address, keyed=True)


def get_deposit_address(agent_id: str, chain: str) -> Call[DepositAddress]:
    path = f"/v1/agents/{_seg(agent_id)}/deposit-addresses/{_seg(chain)}"
    return Call("GET", path, values.deposit_address)


def balances(agent_id: str) -> Call[list[Balance]]:
    return Call("GET", f"/v1/agents/{_seg(agent_id)}/balances", values.balances)


# --- deposits -----------------------------------------------------------------------------


def list_deposits(
    *,
    agent: str | None = None,
    chain: str | None = None,
    status: str | None = None,
    cursor: int | None = None,
    limit: int | None = None,
) -> Call[Page[Deposit]]:
    params = _params(agent=agent, chain=chain, status=status, cursor=cursor, limit=limit)
    return Call("GET", "/v1/deposits", values.page_of(values.deposit), params=params)


# --- escrows ------------------------------------------------------------------------------


def fund_escrow(
    *,
    job_id: str,
    buyer: str,
    worker: str,
    asset: str,
    amount: Amount,
    fee_bps: int | None = None,
    expires_at: datetime | None = None,
) -> Call[Escrow]:
    body = _present(
        job_id=job_id,
        buyer=buyer,
        worker=worker,
        asset=asset,
        amount=units(amount),
        fee_bps=fee_bps,
        expires_at=None if expires_at is None else expires_at.isoformat(),
    )
    return Call("POST", "/v1/escrows", values.escrow, body, keyed=True)


def get_escrow(job_id: str) -> Call[Escrow]:
    return Call("GET", f"/v1/escrows/{_seg(job_id)}", values.escrow)


def release_escrow(job_id: str) -> Call[Escrow]:
    return Call("POST", f"/v1/escrows/{_seg(job_id)}/release", values.escrow, keyed=True)


def refund_escrow(job_id: str) -> Call[Escrow]:
    return Call("POST", f"/v1/escrows/{_seg(job_id)}/refund", values.escrow, keyed=True)


def resolve_escrow(job_id: str, worker_amount: Amount) -> Call[Escrow]:
    body = {"worker_amount": units(worker_amount, "worker_amount")}
    path = f"/v1/escrows/{_seg(job_id)}/resolve"
    return Call("POST", path, values.escrow, body, keyed=True)


# --- withdrawals --------------------------------------------------------------------------


def withdraw(
    *, agent: str, asset: str, chain: str, to_address: str, amount: Amount
) -> Call[Withdrawal]:
    body = {
        "agent_id": agent,
        "asset": asset,
        "chain": chain,
        "to_address": to_address,
        "amount": units(amount),
    }
    return Call("POST", "/v1/withdrawals", values.withdrawal, body, keyed=True)


# --- audit --------------------------------------------------------------------------------


def list_audit(
    *,
    stream: str | None = None,
    escrow: str | None = None,
    agent: str | None = None,
    cursor: int | None = None,
    limit: int | None = None,
) -> Call[Page[AuditRow]]:
    params = _params(stream=stream, escrow=escrow, agent=agent, cursor=cursor, limit=limit)
    return Call("GET", "/v1/audit", values.page_of(values.audit_row), params=params)


def verify_audit() -> Call[AuditReport]:
    # Read-only: the API takes no Idempotency-Key here.
    return Call("POST", "/v1/audit/verify", values.audit_report)


# --- webhooks -----------------------------------------------------------------------------


def create_webhook_endpoint(url: str, event_types: Iterable[str] = ("*",)) -> Call[WebhookEndpoint]:
    body = {"url": url, "event_types": list(event_types)}
    return Call("POST", "/v1/webhook-endpoints", values.webhook_endpoint, body, keyed=True)


def list_webhook_endpoints() -> Call[list[WebhookEndpoint]]:
    return Call("GET", "/v1/webhook-endpoints", values.webhook_endpoints)


def delete_webhook_endpoint(endpoint_id: int) -> Call[WebhookEndpoint]:
    path = f"/v1/webhook-endpoints/{_seg(endpoint_id)}"
    return Call("DELETE", path, values.webhook_endpoint)


def rotate_webhook_secret(endpoint_id: int) -> Call[str | None]:
    path = f"/v1/webhook-endpoints/{_seg(endpoint_id)}/rotate-secret"
    return Call("POST", path, values.webhook_secret, keyed=True)


def list_webhook_deliveries(
    *,
    endpoint_id: int | None = None,
    status: str | None = None,
    cursor: int | None = None,
    limit: int | None = None,
) -> Call[Page[WebhookDelivery]]:
    params = _params(endpoint_id=endpoint_id, status=status, cursor=cursor, limit=limit)
    read = values.page_of(values.webhook_delivery)
    return Call("GET", "/v1/webhook-deliveries", read, params=params)


def redeliver_webhook(delivery_id: int) -> Call[WebhookDelivery]:
    path = f"/v1/webhook-deliveries/{_seg(delivery_id)}/redeliver"
    return Call("POST", path, values.webhook_delivery, keyed=True)
