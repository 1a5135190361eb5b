"""Every operation of the HTTP API /v1 as a `Call`: path, body and how to read the answer.

The sync and the async client both send these; a new endpoint is one function here, one
short method of the same name in each client and one line of `OPERATIONS` (a test holds
that table to /openapi.json). Amounts go out as decimal strings in the asset's units
("12.5"), as the API takes them; a Decimal is written out exactly, and a number of any
other type is refused, since 12 could mean 12 USDC or 12 base units. Networks are named
by `network` (the API's old name `chain` is never sent).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import quote

from escrowd.client import values
from escrowd.client.calls import Call
from escrowd.client.errors import InvalidAmount
from escrowd.client.values import (
    AuditReport,
    AuditRow,
    ChainFamily,
    Deposit,
    DepositAddress,
    Escrow,
    Network,
    Page,
    WebhookDelivery,
    WebhookEndpoint,
    Withdrawal,
)
from escrowd.escrow.values import Agent, Balance, Subscription, SubscriptionCharge

Amount = str | Decimal
Interval = Literal["day", "week", "month"]

# Every operation of the API, as /openapi.json names it (method and path), and the name of
# the function here and of the method of both clients that send it.
OPERATIONS: dict[str, str] = {
    "POST /v1/agents": "register_agent",
    "GET /v1/agents/{agent_id}": "get_agent",
    "POST /v1/agents/{agent_id}/deposit-addresses/{chain_family}": "create_deposit_address",
    "GET /v1/agents/{agent_id}/deposit-addresses/{chain_family}": "get_deposit_address",
    "GET /v1/agents/{agent_id}/balances": "balances",
    "GET /v1/networks": "list_networks",
    "GET /v1/deposits": "list_deposits",
    "POST /v1/escrows": "fund_escrow",
    "GET /v1/escrows/{job_id}": "get_escrow",
    "POST /v1/escrows/{job_id}/release": "release_escrow",
    "POST /v1/escrows/{job_id}/refund": "refund_escrow",
    "POST /v1/escrows/{job_id}/resolve": "resolve_escrow",
    "POST /v1/deposit-funded-escrows": "fund_escrow_from_deposit",
    "POST /v1/withdrawals": "withdraw",
    "GET /v1/withdrawals": "list_withdrawals",
    "GET /v1/withdrawals/{withdrawal_id}": "get_withdrawal",
    "POST /v1/subscriptions": "create_subscription",
    "GET /v1/subscriptions": "list_subscriptions",
    "GET /v1/subscriptions/{subscription_id}": "get_subscription",
    "GET /v1/subscriptions/{subscription_id}/charges": "list_subscription_charges",
    "POST /v1/subscriptions/{subscription_id}/cancel": "cancel_subscription",
    "POST /v1/subscriptions/{subscription_id}/resume": "resume_subscription",
    "GET /v1/audit": "list_audit",
    "POST /v1/audit/verify": "verify_audit",
    "POST /v1/webhook-endpoints": "create_webhook_endpoint",
    "GET /v1/webhook-endpoints": "list_webhook_endpoints",
    "DELETE /v1/webhook-endpoints/{endpoint_id}": "delete_webhook_endpoint",
    "POST /v1/webhook-endpoints/{endpoint_id}/rotate-secret": "rotate_webhook_secret",
    "GET /v1/webhook-deliveries": "list_webhook_deliveries",
    "POST /v1/webhook-deliveries/{delivery_id}/redeliver": "redeliver_webhook",
}


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


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


# --- agents -------------------------------------------------------------------------------


def register_agent(agent_id: str, name: str | None = None) -> Call[Agent]:
    return Call("POST", "/v1/agents", values.agent, _present(id=agent_id, name=name), keyed=True)


def get_agent(agent_id: str) -> Call[Agent]:
    return Call("GET", f"/v1/agents/{_seg(agent_id)}", values.agent)


def create_deposit_address(agent_id: str, chain_family: ChainFamily) -> Call[DepositAddress]:
    path = f"/v1/agents/{_seg(agent_id)}/deposit-addresses/{_seg(chain_family)}"
    return Call("POST", path, values.deposit_address, keyed=True)


def get_deposit_address(agent_id: str, chain_family: ChainFamily) -> Call[DepositAddress]:
    path = f"/v1/agents/{_seg(agent_id)}/deposit-addresses/{_seg(chain_family)}"
    return Call("GET", path, values.deposit_address)


def balances(agent_id: str) -> Call[list[Balance]]:
    return Call("GET", f"/v1/agents/{_seg(agent_id)}/balances", values.balances)


# --- networks and deposits ----------------------------------------------------------------


def list_networks() -> Call[list[Network]]:
    return Call("GET", "/v1/networks", values.networks)


def list_deposits(
    *,
    agent: str | None = None,
    network: str | None = None,
    status: str | None = None,
    cursor: int | None = None,
    limit: int | None = None,
) -> Call[Page[Deposit]]:
    params = _params(agent=agent, network=network, status=status, cursor=cursor, limit=limit)
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
        expires_at=_time(expires_at),
    )
    return Call("POST", "/v1/escrows", values.escrow, body, keyed=True)


def fund_escrow_from_deposit(
    *,
    job_id: str,
    worker: str,
    network: str,
    tx_hash: str,
    log_index: int | None = None,
    buyer: str | None = None,
    amount: Amount | None = None,
    fee_bps: int | None = None,
    expires_at: datetime | None = None,
) -> Call[Escrow]:
    body = _present(
        job_id=job_id,
        worker=worker,
        deposit=_present(network=network, tx_hash=tx_hash, log_index=log_index),
        buyer=buyer,
        amount=None if amount is None else units(amount),
        fee_bps=fee_bps,
        expires_at=_time(expires_at),
    )
    return Call("POST", "/v1/deposit-funded-escrows", values.escrow, body, keyed=True)


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
    *, agent: str, asset: str, network: str, to_address: str, amount: Amount
) -> Call[Withdrawal]:
    body = {
        "agent_id": agent,
        "asset": asset,
        "network": network,
        "to_address": to_address,
        "amount": units(amount),
    }
    return Call("POST", "/v1/withdrawals", values.withdrawal, body, keyed=True)


def list_withdrawals(
    *,
    agent: str | None = None,
    network: str | None = None,
    status: str | None = None,
    cursor: int | None = None,
    limit: int | None = None,
) -> Call[Page[Withdrawal]]:
    params = _params(agent=agent, network=network, status=status, cursor=cursor, limit=limit)
    return Call("GET", "/v1/withdrawals", values.page_of(values.withdrawal), params=params)


def get_withdrawal(withdrawal_id: int) -> Call[Withdrawal]:
    return Call("GET", f"/v1/withdrawals/{_seg(withdrawal_id)}", values.withdrawal)


# --- subscriptions ------------------------------------------------------------------------


def create_subscription(
    *,
    subscription_id: str,
    buyer: str,
    asset: str,
    amount: Amount,
    interval: Interval,
    interval_count: int | None = None,
    worker: str | None = None,
    fee_bps: int | None = None,
    starts_at: datetime | None = None,
) -> Call[Subscription]:
    body = _present(
        id=subscription_id,
        buyer=buyer,
        worker=worker,
        asset=asset,
        amount=units(amount),
        interval=interval,
        interval_count=interval_count,
        fee_bps=fee_bps,
        starts_at=_time(starts_at),
    )
    return Call("POST", "/v1/subscriptions", values.subscription, body, keyed=True)


def list_subscriptions(
    *,
    buyer: str | None = None,
    status: str | None = None,
    cursor: int | None = None,
    limit: int | None = None,
) -> Call[Page[Subscription]]:
    params = _params(buyer=buyer, status=status, cursor=cursor, limit=limit)
    read = values.page_of(values.subscription)
    return Call("GET", "/v1/subscriptions", read, params=params)


def get_subscription(subscription_id: str) -> Call[Subscription]:
    return Call("GET", f"/v1/subscriptions/{_seg(subscription_id)}", values.subscription)


def list_subscription_charges(
    subscription_id: str, *, cursor: int | None = None, limit: int | None = None
) -> Call[Page[SubscriptionCharge]]:
    """A page of charges by period; the cursor is a period index (0 is a valid one)."""
    path = f"/v1/subscriptions/{_seg(subscription_id)}/charges"
    read = values.page_of(values.subscription_charge)
    return Call("GET", path, read, params=_params(cursor=cursor, limit=limit))


def cancel_subscription(
    subscription_id: str, *, requested_by: Literal["buyer", "marketplace"] | None = None
) -> Call[Subscription]:
    path = f"/v1/subscriptions/{_seg(subscription_id)}/cancel"
    body = _present(requested_by=requested_by)
    return Call("POST", path, values.subscription, body, keyed=True)


def resume_subscription(subscription_id: str) -> Call[Subscription]:
    path = f"/v1/subscriptions/{_seg(subscription_id)}/resume"
    return Call("POST", path, values.subscription, keyed=True)


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
