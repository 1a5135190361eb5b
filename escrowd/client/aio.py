"""`AsyncEscrowdClient`: the HTTP API from asyncio code (a FastAPI or aiohttp backend).

Every changing call takes an optional `idempotency_key`: without one, a fresh key is made
per call and reused on that call's retries. Pass your own (derived from your job or
payment id) to make a call safe to repeat across a restart of your process as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from typing import Self, TypeVar

import httpx

from escrowd.client import operations as ops
from escrowd.client.calls import RETRYABLE_ERRORS, Attempts, Call, RetryPolicy, outcome
from escrowd.client.operations import Amount
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
        self, agent_id: str, chain: str, *, idempotency_key: str | None = None
    ) -> DepositAddress:
        return await self.send(ops.create_deposit_address(agent_id, chain), idempotency_key)

    async def get_deposit_address(self, agent_id: str, chain: str) -> DepositAddress:
        return await self.send(ops.get_deposit_address(agent_id, chain))

    async def balances(self, agent_id: str) -> list[Balance]:
        return await self.send(ops.balances(agent_id))

    # --- deposits -------------------------------------------------------------------------

    async def list_deposits(
        self,
        *,
        agent: str | None = None,
        chain: str | None = None,
        status: str | None = None,
        cursor: int | None = None,
        limit: int | None = None,
    ) -> Page[Deposit]:
        return await self.send(
            ops.list_deposits(agent=agent, chain=chain, status=status, cursor=cursor, limit=limit)
        )

    def iter_deposits(
        self,
        *,
        agent: str | None = None,
        chain: str | None = None,
        status: str | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Deposit]:
        """Every matching deposit, oldest first, fetched a page at a time."""
        return self._each(
            lambda cursor: ops.list_deposits(
                agent=agent, chain=chain, status=status, cursor=cursor, limit=page_size
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
        chain: str,
        to_address: str,
        amount: Amount,
        idempotency_key: str | None = None,
    ) -> Withdrawal:
        call = ops.withdraw(
            agent=agent, asset=asset, chain=chain, to_address=to_address, amount=amount
        )
        return await self.send(call, idempotency_key)

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
