"""`EscrowdClient`: the HTTP API from synchronous code (a Flask or Django backend, a script).

Every changing call takes an optional `idempotency_key`: without one, a fresh key is made
per call and reused on that call's retries. Pass your own (derived from your job or
payment id) to make a call safe to repeat across a restart of your process as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
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


class EscrowdClient:
    """A connection pool to one escrowd API; use as a context manager or `close()` it.

    `transport` replaces the network (an ``httpx.MockTransport`` in tests)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"EscrowdClient({str(self._http.base_url)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call[T], idempotency_key: str | None = None) -> T:
        """Send one logical call, retrying per `self.retry`; its value or typed error."""
        attempts = Attempts(self.retry, call, idempotency_key)
        while True:
            attempts.start()
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    json=call.body,
                    params=call.params,
                    headers=attempts.headers,
                )
            except RETRYABLE_ERRORS as exc:
                time.sleep(attempts.after_failure(exc))
                continue
            wait_s = attempts.after_answer(
                response.status_code, response.headers.get("Retry-After")
            )
            if wait_s is None:
                return outcome(call, response.status_code, response.content)
            time.sleep(wait_s)

    def _each(self, page: Callable[[int | None], Call[Page[T]]]) -> Iterator[T]:
        cursor: int | None = None
        while True:
            found = self.send(page(cursor))
            yield from found.items
            if found.next_cursor is None:
                return
            cursor = found.next_cursor

    # --- agents ---------------------------------------------------------------------------

    def register_agent(
        self, agent_id: str, name: str | None = None, *, idempotency_key: str | None = None
    ) -> Agent:
        return self.send(ops.register_agent(agent_id, name), idempotency_key)

    def get_agent(self, agent_id: str) -> Agent:
        return self.send(ops.get_agent(agent_id))

    def create_deposit_address(
        self, agent_id: str, chain: str, *, idempotency_key: str | None = None
    ) -> DepositAddress:
        return self.send(ops.create_deposit_address(agent_id, chain), idempotency_key)

    def get_deposit_address(self, agent_id: str, chain: str) -> DepositAddress:
        return self.send(ops.get_deposit_address(agent_id, chain))

    def balances(self, agent_id: str) -> list[Balance]:
        return self.send(ops.balances(agent_id))

    # --- deposits -------------------------------------------------------------------------

    def list_deposits(
        self,
        *,
        agent: str | None = None,
        chain: str | None = None,
        status: str | None = None,
        cursor: int | None = None,
        limit: int | None = None,
    ) -> Page[Deposit]:
        return self.send(
            ops.list_deposits(agent=agent, chain=chain, status=status, cursor=cursor, limit=limit)
        )

    def iter_deposits(
        self,
        *,
        agent: str | None = None,
        chain: str | None = None,
        status: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[Deposit]:
        """Every matching deposit, oldest first, fetched a page at a time."""
        return self._each(
            lambda cursor: ops.list_deposits(
                agent=agent, chain=chain, status=status, cursor=cursor, limit=page_size
            )
        )

    # --- escrows --------------------------------------------------------------------------

    def fund_escrow(
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
        return self.send(call, idempotency_key)

    def get_escrow(self, job_id: str) -> Escrow:
        return self.send(ops.get_escrow(job_id))

    def release_escrow(self, job_id: str, *, idempotency_key: str | None = None) -> Escrow:
        return self.send(ops.release_escrow(job_id), idempotency_key)

    def refund_escrow(self, job_id: str, *, idempotency_key: str | None = None) -> Escrow:
        return self.send(ops.refund_escrow(job_id), idempotency_key)

    def resolve_escrow(
        self, job_id: str, worker_amount: Amount, *, idempotency_key: str | None = None
    ) -> Escrow:
        return self.send(ops.resolve_escrow(job_id, worker_amount), idempotency_key)

    # --- withdrawals ----------------------------------------------------------------------

    def withdraw(
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
        return self.send(call, idempotency_key)

    # --- audit ----------------------------------------------------------------------------

    def list_audit(
        self,
        *,
        stream: str | None = None,
        escrow: str | None = None,
        agent: str | None = None,
        cursor: int | None = None,
        limit: int | None = None,
    ) -> Page[AuditRow]:
        return self.send(
            ops.list_audit(stream=stream, escrow=escrow, agent=agent, cursor=cursor, limit=limit)
        )

    def iter_audit(
        self,
        *,
        stream: str | None = None,
        escrow: str | None = None,
        agent: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[AuditRow]:
        """Audit rows of one stream, escrow (job id) or agent, oldest first."""
        return self._each(
            lambda cursor: ops.list_audit(
                stream=stream, escrow=escrow, agent=agent, cursor=cursor, limit=page_size
            )
        )

    def verify_audit(self) -> AuditReport:
        return self.send(ops.verify_audit())

    # --- webhooks -------------------------------------------------------------------------

    def create_webhook_endpoint(
        self,
        url: str,
        event_types: Iterable[str] = ("*",),
        *,
        idempotency_key: str | None = None,
    ) -> WebhookEndpoint:
        return self.send(ops.create_webhook_endpoint(url, event_types), idempotency_key)

    def list_webhook_endpoints(self) -> list[WebhookEndpoint]:
        return self.send(ops.list_webhook_endpoints())

    def delete_webhook_endpoint(self, endpoint_id: int) -> WebhookEndpoint:
        """Stop sending to an endpoint. DELETE takes no Idempotency-Key: a retry after a
        lost answer finds the endpoint gone and raises NotFound."""
        return self.send(ops.delete_webhook_endpoint(endpoint_id))

    def rotate_webhook_secret(
        self, endpoint_id: int, *, idempotency_key: str | None = None
    ) -> str | None:
        return self.send(ops.rotate_webhook_secret(endpoint_id), idempotency_key)

    def list_webhook_deliveries(
        self,
        *,
        endpoint_id: int | None = None,
        status: str | None = None,
        cursor: int | None = None,
        limit: int | None = None,
    ) -> Page[WebhookDelivery]:
        return self.send(
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
    ) -> Iterator[WebhookDelivery]:
        """Deliveries newest first."""
        return self._each(
            lambda cursor: ops.list_webhook_deliveries(
                endpoint_id=endpoint_id, status=status, cursor=cursor, limit=page_size
            )
        )

    def redeliver_webhook(
        self, delivery_id: int, *, idempotency_key: str | None = None
    ) -> WebhookDelivery:
        return self.send(ops.redeliver_webhook(delivery_id), idempotency_key)
