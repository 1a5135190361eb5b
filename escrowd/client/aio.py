"""`AsyncEscrowdClient`: the HTTP API from asyncio code (a FastAPI or aiohttp backend).

Every changing call takes an optional `idempotency_key`: without one, a fresh key is made
per call and reused on that call's retries. Pass your own (derived from your job or
payment id) to make a call safe to repeat across a restart of your process as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from typing import Literal, Self, TypeVar

import httpx

from escrowd.client import operations as ops
from escrowd.client.calls import RETRYABLE_ERRORS, Attempts, Call, RetryPolicy, outcome
from escrowd.client.operations import Amount, Interval
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

T = TypeVar("T")


class AsyncEscrowdClient:
    """A connection pool to one escrowd API; use as an async context manager or `aclose()`
    it.

    `transport` replaces the network (an ``httpx.MockTransport`` in tests)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"AsyncEscrowdClient({str(self._http.base_url)!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call[T], idempotency_key: str | None = None) -> T:
        """Send one logical call, retrying per `self.retry`; its value or typed error."""
        attempts = Attempts(self.retry, call, idempotency_key)
        while True:
            attempts.start()
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    json=call.body,
                    params=call.params,
                    headers=attempts.headers,
                )
            except RETRYABLE_ERRORS as exc:
                await asyncio.sleep(attempts.after_failure(exc))
                continue
            wait_s = attempts.after_answer(
                response.status_code, response.headers.get("Retry-After")
            )
            if wait_s is None:
                return outcome(call, response.status_code, response.content)
            await asyncio.sleep(wait_s)

    async def _each(self, page: Callable[[int | None], Call[Page[T]]]) -> AsyncIterator[T]:
        cursor: int | None = None
        while True:
            found = await self.send(page(cursor))
            for item in found.items:
                yield item
            if found.next_cursor is None:
                return
            cursor = found.next_cursor

    # --- agents ---------------------------------------------------------------------------

    async def register_agent(
        self, agent_id: str, name: str | None = None, *, idempotency_key: str | None = None
    ) -> Agent:
        return await self.send(ops.register_agent(agent_id, name), idempotency_key)

    async def get_agent(self, agent_id: str) -> Agent:
        return await self.send(ops.get_agent(agent_id))

    async def create_deposit_address(
        self, agent_id: str, chain_family: ChainFamily, *, idempotency_key: str | None = None
    ) -> DepositAddress:
        """The agent's address for a chain family (evm, solana), allocated on first call;
        it receives on every network of the family (`networks`)."""
        return await self.send(ops.create_deposit_address(agent_id, chain_family), idempotency_key)

    async def get_deposit_address(self, agent_id: str, chain_family: ChainFamily) -> DepositAddress:
        return await self.send(ops.get_deposit_address(agent_id, chain_family))

    async def balances(self, agent_id: str) -> list[Balance]:
        return await self.send(ops.balances(agent_id))

    # --- networks and deposits ------------------------------------------------------------

    async def list_networks(self) -> list[Network]:
        """The configured networks: the values `network=` takes, with their assets."""
        return await self.send(ops.list_networks())

    async def list_deposits(
        self,
        *,
        agent: str | None = None,
        network: str | None = None,
        status: str | None = None,
        cursor: int | None = None,
        limit: int | None = None,
    ) -> Page[Deposit]:
        return await self.send(
            ops.list_deposits(
                agent=agent, network=network, status=status, cursor=cursor, limit=limit
            )
        )

    def iter_deposits(
        self,
        *,
        agent: str | None = None,
        network: str | None = None,
        status: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Deposit]:
        """Every matching deposit, oldest first, fetched a page at a time."""
        return self._each(
            lambda cursor: ops.list_deposits(
                agent=agent, network=network, status=status, cursor=cursor, limit=page_size
            )
        )

    # --- escrows --------------------------------------------------------------------------

    async def fund_escrow(
        self,
        *,
        job_id: str,
        buyer: str,
        worker: str,
        asset: str,
        amount: Amount,
        fee_bps: int | None = None,
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> Escrow:
        call = ops.fund_escrow(
            job_id=job_id,
            buyer=buyer,
            worker=worker,
            asset=asset,
            amount=amount,
            fee_bps=fee_bps,
            expires_at=expires_at,
        )
        return await self.send(call, idempotency_key)

    async def fund_escrow_from_deposit(
        self,
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
        idempotency_key: str | None = None,
    ) -> Escrow:
        """Fund an escrow from one confirmed deposit (network, tx hash and, when the
        transaction holds several, its log index, as `list_deposits` shows them): the
        agent it credited is the buyer; the escrow holds what it credited, or `amount`.
        A deposit funds one escrow at most (DepositUsed); one not confirmed yet raises
        DepositPending: call again later with the same `idempotency_key`."""
        call = ops.fund_escrow_from_deposit(
            job_id=job_id,
            worker=worker,
            network=network,
            tx_hash=tx_hash,
            log_index=log_index,
            buyer=buyer,
            amount=amount,
            fee_bps=fee_bps,
            expires_at=expires_at,
        )
        return await self.send(call, idempotency_key)

    async def get_escrow(self, job_id: str) -> Escrow:
        return await self.send(ops.get_escrow(job_id))

    async def release_escrow(self, job_id: str, *, idempotency_key: str | None = None) -> Escrow:
        return await self.send(ops.release_escrow(job_id), idempotency_key)

    async def refund_escrow(self, job_id: str, *, idempotency_key: str | None = None) -> Escrow:
        return await self.send(ops.refund_escrow(job_id), idempotency_key)

    async def resolve_escrow(
        self, job_id: str, worker_amount: Amount, *, idempotency_key: str | None = None
    ) -> Escrow:
        return await self.send(ops.resolve_escrow(job_id, worker_amount), idempotency_key)

    # --- withdrawals ----------------------------------------------------------------------

    async def withdraw(
        self,
        *,
        agent: str,
        asset: str,
        network: str,
        to_address: str,
        amount: Amount,
        idempotency_key: str | None = None,
    ) -> Withdrawal:
        """Hold `amount` of the agent's balance for a payout to `to_address` on `network`.
        Pass an `idempotency_key` of your own (your payout's id) to make it safe to
        repeat across restarts: the same key returns the same withdrawal."""
        call = ops.withdraw(
            agent=agent, asset=asset, network=network, to_address=to_address, amount=amount
        )
        return await self.send(call, idempotency_key)

    async def list_withdrawals(
        self,
        *,
        agent: str | None = None,
        network: str | None = None,
        status: str | None = None,
        cursor: int | None = None,
        limit: int | None = None,
    ) -> Page[Withdrawal]:
        return await self.send(
            ops.list_withdrawals(
                agent=agent, network=network, status=status, cursor=cursor, limit=limit
            )
        )

    def iter_withdrawals(
        self,
        *,
        agent: str | None = None,
        network: str | None = None,
        status: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Withdrawal]:
        """Payouts to agents (withdrawals and escrow payouts), oldest first."""
        return self._each(
            lambda cursor: ops.list_withdrawals(
                agent=agent, network=network, status=status, cursor=cursor, limit=page_size
            )
        )

    async def get_withdrawal(self, withdrawal_id: int) -> Withdrawal:
        """One payout by the id `withdraw` and the payout.* events give."""
        return await self.send(ops.get_withdrawal(withdrawal_id))

    # --- subscriptions --------------------------------------------------------------------

    async def create_subscription(
        self,
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
        idempotency_key: str | None = None,
    ) -> Subscription:
        """Charge `amount` from `buyer` every `interval_count` `interval`s, to `worker`
        minus the fee or, with no worker, to the platform. Without `starts_at` the first
        period is charged now (InsufficientFunds, and nothing created, if it cannot be)."""
        call = ops.create_subscription(
            subscription_id=subscription_id,
            buyer=buyer,
            asset=asset,
            amount=amount,
            interval=interval,
            interval_count=interval_count,
            worker=worker,
            fee_bps=fee_bps,
            starts_at=starts_at,
        )
        return await self.send(call, idempotency_key)

    async def list_subscriptions(
        self,
        *,
        buyer: str | None = None,
        status: str | None = None,
        cursor: int | None = None,
        limit: int | None = None,
    ) -> Page[Subscription]:
        return await self.send(
            ops.list_subscriptions(buyer=buyer, status=status, cursor=cursor, limit=limit)
        )

    def iter_subscriptions(
        self,
        *,
        buyer: str | None = None,
        status: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscriptions oldest first."""
        return self._each(
            lambda cursor: ops.list_subscriptions(
                buyer=buyer, status=status, cursor=cursor, limit=page_size
            )
        )

    async def get_subscription(self, subscription_id: str) -> Subscription:
        return await self.send(ops.get_subscription(subscription_id))

    async def list_subscription_charges(
        self, subscription_id: str, *, cursor: int | None = None, limit: int | None = None
    ) -> Page[SubscriptionCharge]:
        return await self.send(
            ops.list_subscription_charges(subscription_id, cursor=cursor, limit=limit)
        )

    def iter_subscription_charges(
        self, subscription_id: str, *, page_size: int | None = None
    ) -> AsyncIterator[SubscriptionCharge]:
        """A subscription's charges by period; a failed one shows its error and attempts."""
        return self._each(
            lambda cursor: ops.list_subscription_charges(
                subscription_id, cursor=cursor, limit=page_size
            )
        )

    async def cancel_subscription(
        self,
        subscription_id: str,
        *,
        requested_by: Literal["buyer", "marketplace"] | None = None,
        idempotency_key: str | None = None,
    ) -> Subscription:
        """Stop charging for good; `requested_by` is recorded (escrowd's default:
        marketplace)."""
        call = ops.cancel_subscription(subscription_id, requested_by=requested_by)
        return await self.send(call, idempotency_key)

    async def resume_subscription(
        self, subscription_id: str, *, idempotency_key: str | None = None
    ) -> Subscription:
        """Reactivate a paused subscription, charging the current period now."""
        return await self.send(ops.resume_subscription(subscription_id), idempotency_key)

    # --- audit ----------------------------------------------------------------------------

    async def list_audit(
        self,
        *,
        stream: str | None = None,
        escrow: str | None = None,
        agent: str | None = None,
        cursor: int | None = None,
        limit: int | None = None,
    ) -> Page[AuditRow]:
        return await self.send(
            ops.list_audit(stream=stream, escrow=escrow, agent=agent, cursor=cursor, limit=limit)
        )

    def iter_audit(
        self,
        *,
        stream: str | None = None,
        escrow: str | None = None,
        agent: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[AuditRow]:
        """Audit rows of one stream, escrow (job id) or agent, oldest first."""
        return self._each(
            lambda cursor: ops.list_audit(
                stream=stream, escrow=escrow, agent=agent, cursor=cursor, limit=page_size
            )
        )

    async def verify_audit(self) -> AuditReport:
        return await self.send(ops.verify_audit())

    # --- webhooks -------------------------------------------------------------------------

    async def create_webhook_endpoint(
        self,
        url: str,
        event_types: Iterable[str] = ("*",),
        *,
        idempotency_key: str | None = None,
    ) -> WebhookEndpoint:
        return await self.send(ops.create_webhook_endpoint(url, event_types), idempotency_key)

    async def list_webhook_endpoints(self) -> list[WebhookEndpoint]:
        return await self.send(ops.list_webhook_endpoints())

    async def delete_webhook_endpoint(self, endpoint_id: int) -> WebhookEndpoint:
        """Stop sending to an endpoint. DELETE takes no Idempotency-Key: a retry after a
        lost answer finds the endpoint gone and raises NotFound."""
        return await self.send(ops.delete_webhook_endpoint(endpoint_id))

    async def rotate_webhook_secret(
        self, endpoint_id: int, *, idempotency_key: str | None = None
    ) -> str | None:
        return await self.send(ops.rotate_webhook_secret(endpoint_id), idempotency_key)

    async def list_webhook_deliveries(
        self,
        *,
        endpoint_id: int | None = None,
        status: str | None = None,
        cursor: int | None = None,
        limit: int | None = None,
    ) -> Page[WebhookDelivery]:
        return await self.send(
            ops.list_webhook_deliveries(
                endpoint_id=endpoint_id, status=status, cursor=cursor, limit=limit
            )
        )

    def iter_webhook_deliveries(
        self,
        *,
        endpoint_id: int | None = None,
        status: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[WebhookDelivery]:
        """Deliveries newest first."""
        return self._each(
            lambda cursor: ops.list_webhook_deliveries(
                endpoint_id=endpoint_id, status=status, cursor=cursor, limit=page_size
            )
        )

    async def redeliver_webhook(
        self, delivery_id: int, *, idempotency_key: str | None = None
    ) -> WebhookDelivery:
        return await self.send(ops.redeliver_webhook(delivery_id), idempotency_key)
