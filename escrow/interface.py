"""`EscrowService` and `AsyncEscrowService`: the escrow use cases for a Python backend in
the same process.

Each call is one transaction (retried on deadlock or serialization failure), with the
same semantics and the same typed errors as the HTTP API (`escrowd.escrow.errors`,
`escrowd.config.errors`: the classes the API maps to statuses). Amounts are integers in
base units. Calls return the plain values of `escrowd.escrow.values`, never ORM objects:
nothing returned is bound to escrowd's sessions. On PostgreSQL, funding and settling an
escrow are one database function call each, run as a transaction of its own
(`service.fund_escrow_alone`, `service.settle_escrow_alone`).

`AsyncEscrowService` runs the same calls on a bounded thread pool, for asyncio backends:
the database work is blocking, and a thread per call keeps the event loop free.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import partial
from typing import Any, TypeVar, get_args

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd import models
from escrowd.config.errors import Unavailable
from escrowd.config.settings import Settings
from escrowd.escrow import deposit_funding, service, subscriptions
from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.deposit_funding import FundingDeposit
from escrowd.escrow.payouts import PlatformAddresses, chain_family, minimum_payout
from escrowd.escrow.uow import in_transaction
from escrowd.escrow.values import (
    Agent,
    Balance,
    Escrow,
    EscrowState,
    Subscription,
    SubscriptionCharge,
    Withdrawal,
)
from escrowd.models import utcnow
from escrowd.models.db import make_engine, make_session_factory

T = TypeVar("T")
_STATES: dict[str, EscrowState] = {state: state for state in get_args(EscrowState)}
# Threads of AsyncEscrowService when not given: each holds one pooled connection at most.
DEFAULT_ASYNC_WORKERS = 8


def agent_value(agent: models.Agent) -> Agent:
    return Agent(id=agent.external_id, name=agent.name, created_at=agent.created_at)


def escrow_value(escrow: models.Escrow, buyer: str, worker: str) -> Escrow:
    """The escrow as a value; `buyer` and `worker` are the parties' external ids."""
    return Escrow(
        job_id=escrow.job_id,
        status=_STATES[escrow.status],
        buyer=buyer,
        worker=worker,
        asset=escrow.asset,
        amount_base_units=escrow.amount,
        fee_bps=escrow.fee_bps,
        worker_amount_base_units=escrow.worker_amount,
        fee_amount_base_units=escrow.fee_amount,
        refund_amount_base_units=escrow.refund_amount,
        expires_at=escrow.expires_at,
        resolved_at=escrow.resolved_at,
        created_at=escrow.created_at,
    )


def balance_value(balance: service.AssetBalance) -> Balance:
    return Balance(
        asset=balance.asset,
        decimals=balance.decimals,
        available_base_units=balance.available,
        escrowed_as_buyer_base_units=balance.escrowed_as_buyer,
        incoming_base_units=balance.incoming,
        pending_withdrawals_base_units=balance.pending_withdrawals,
    )


def subscription_value(session: Session, row: models.Subscription) -> Subscription:
    buyer = session.get_one(models.Agent, row.buyer_agent_id).external_id
    worker_id = row.worker_agent_id
    worker = None if worker_id is None else session.get_one(models.Agent, worker_id).external_id
    active = row.status == models.SubscriptionStatus.ACTIVE
    return Subscription(
        id=row.external_id,
        status=row.status,
        buyer=buyer,
        worker=worker,
        asset=row.asset,
        amount_base_units=row.amount,
        fee_bps=row.fee_bps,
        interval=row.interval,
        interval_count=row.interval_count,
        starts_at=row.anchor_at,
        next_period_index=row.next_period,
        next_charge_at=row.next_charge_at if active else None,
        paused_at=row.paused_at,
        canceled_at=row.canceled_at,
        canceled_by=row.canceled_by,
        created_at=row.created_at,
    )


def charge_value(row: models.SubscriptionCharge) -> SubscriptionCharge:
    return SubscriptionCharge(
        period_index=row.period_index,
        period_start=row.period_start,
        status=row.status,
        attempts=row.attempts,
        amount_base_units=row.amount,
        payee_amount_base_units=row.payee_amount,
        fee_amount_base_units=row.fee_amount,
        error=row.last_error,
        charged_at=row.charged_at,
    )


class EscrowService:
    """In-process escrow interface over a database (one transaction per call).

    `platform`: escrowd's own wallets (`PlatformAddresses.of_keystore`, or `.of` with the
    addresses `escrowd keys init` printed); withdrawals are refused until it is given."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings | None = None,
        *,
        platform: PlatformAddresses | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings or Settings()
        self.platform = platform
        self._sessions: sessionmaker[Session] = make_session_factory(engine)
        self._readers: sessionmaker[Session] = make_session_factory(engine, read_only=True)
        self._one_call = engine.dialect.name == "postgresql"
        self._agents = AgentCache()

    @classmethod
    def from_url(
        cls,
        database_url: str,
        settings: Settings | None = None,
        *,
        platform: PlatformAddresses | None = None,
    ) -> EscrowService:
        return cls(make_engine(database_url), settings, platform=platform)

    def close(self) -> None:
        self.engine.dispose()

    def _write(self, work: Callable[[Session], T]) -> T:
        return in_transaction(self._sessions, work)

    def _read(self, work: Callable[[Session], T]) -> T:
        with self._readers() as session, session.begin():
            return work(session)

    def register_agent(self, external_id: str, name: str | None = None) -> Agent:
        """The agent with this marketplace id, created on first call (idempotent)."""
        return self._write(lambda s: agent_value(service.register_agent(s, external_id, name)))

    def get_agent(self, external_id: str) -> Agent:
        return self._read(lambda s: agent_value(service.get_agent(s, external_id)))

    def _known_agent(self, external_id: str) -> models.Agent:
        return self._agents.get(
            external_id, lambda wanted: self._read(lambda s: service.get_agent(s, wanted))
        )

    def _party_names(self, escrow: models.Escrow) -> tuple[str, str]:
        """The external ids of an escrow's buyer and worker, from the agent cache or one
        query (which fills the cache)."""
        ids = (escrow.buyer_agent_id, escrow.worker_agent_id)
        names = [self._agents.external_id(agent_id) for agent_id in ids]
        if None in names:
            loaded = self._read(
                lambda s: {
                    agent.external_id: agent
                    for agent in s.scalars(select(models.Agent).where(models.Agent.id.in_(ids)))
                }
            )
            by_id = {
                agent.id: agent.external_id
                for agent in (self._agents.get(name, loaded.__getitem__) for name in loaded)
            }
            names = [by_id[agent_id] for agent_id in ids]
        buyer, worker = names
        assert buyer is not None and worker is not None
        return buyer, worker

    def _escrow_value(self, escrow: models.Escrow) -> Escrow:
        return escrow_value(escrow, *self._party_names(escrow))

    def balances(self, external_id: str) -> list[Balance]:
        """Per asset: what the agent can spend and what it has locked as a buyer."""
        return self._read(
            lambda s: [
                balance_value(b) for b in service.balances(s, service.get_agent(s, external_id))
            ]
        )

    def get_escrow(self, job_id: str) -> Escrow:
        return self._escrow_value(self._read(lambda s: service.get_escrow(s, job_id)))

    def fund_escrow(
        self,
        *,
        job_id: str,
        buyer: str,
        worker: str,
        asset: str,
        amount: int,
        fee_bps: int | None = None,
        expires_at: datetime | None = None,
    ) -> Escrow:
        """Lock `amount` base units of the buyer's `asset` for `job_id`. Agents are named
        by their external ids; fee_bps defaults to the configured platform fee."""
        bps = self.settings.escrow.default_fee_bps if fee_bps is None else fee_bps
        if self._one_call:
            funded = service.fund_escrow_alone(
                self.engine,
                job_id=job_id,
                buyer=self._known_agent(buyer),
                worker=self._known_agent(worker),
                asset=asset,
                amount=amount,
                fee_bps=bps,
                expires_at=expires_at,
                actor="python",
            )
            return escrow_value(funded, buyer, worker)

        def work(s: Session) -> Escrow:
            escrow = service.fund_escrow(
                s,
                job_id=job_id,
                buyer=service.get_agent(s, buyer),
                worker=service.get_agent(s, worker),
                asset=asset,
                amount=amount,
                fee_bps=bps,
                expires_at=expires_at,
                actor="python",
            )
            return escrow_value(escrow, buyer, worker)

        return self._write(work)

    def release_escrow(self, job_id: str) -> Escrow:
        """Pay the worker amount - fee and the platform the fee."""
        if self._one_call:
            return self._escrow_value(
                service.settle_escrow_alone(self.engine, job_id, service.RELEASE, actor="python")
            )
        return self._escrow_value(
            self._write(lambda s: service.release_escrow(s, job_id, actor="python"))
        )

    def refund_escrow(self, job_id: str) -> Escrow:
        """Return the whole amount to the buyer (from funded or expired)."""
        if self._one_call:
            return self._escrow_value(
                service.settle_escrow_alone(self.engine, job_id, service.REFUND, actor="python")
            )
        return self._escrow_value(
            self._write(lambda s: service.refund_escrow(s, job_id, actor="python"))
        )

    def resolve_escrow(self, job_id: str, worker_amount: int) -> Escrow:
        """Split a disputed escrow: `worker_amount` base units (minus the fee on them) to
        the worker, the rest back to the buyer."""
        if self._one_call:
            return self._escrow_value(
                service.settle_escrow_alone(
                    self.engine,
                    job_id,
                    service.RESOLVE,
                    worker_amount=worker_amount,
                    actor="python",
                )
            )
        return self._escrow_value(
            self._write(lambda s: service.resolve_escrow(s, job_id, worker_amount, actor="python"))
        )

    def expire_due_escrows(self, now: datetime, *, limit: int = 100) -> list[str]:
        """Expire and refund funded escrows due at `now`; returns their job ids."""
        return self._write(lambda s: service.expire_due_escrows(s, now, limit=limit))

    def withdraw(
        self,
        *,
        agent: str,
        asset: str,
        chain: str,
        to_address: str,
        amount: int,
        idempotency_key: str,
    ) -> Withdrawal:
        """Hold `amount` base units of the agent's balance for an on-chain payout; the
        same `idempotency_key` for the same agent returns the original withdrawal."""
        platform = self.platform
        if platform is None:
            raise Unavailable(
                "withdrawals need escrowd's own wallet addresses to refuse them as "
                "destinations: construct EscrowService with platform=PlatformAddresses(...)"
            )
        family = chain_family(self.settings, chain)
        minimum = minimum_payout(self.settings, asset)

        def work(s: Session) -> Withdrawal:
            payout = service.withdraw(
                s,
                agent=service.get_agent(s, agent),
                asset=asset,
                chain=chain,
                family=family,
                to_address=to_address,
                amount=amount,
                idempotency_key=idempotency_key,
                min_amount_base_units=minimum,
                platform=platform,
            )
            return Withdrawal(
                id=payout.id,
                agent=agent,
                chain=payout.chain,
                asset=asset,
                destination=payout.destination,
                amount_base_units=payout.amount,
                status=payout.status,
                created_at=payout.created_at,
            )

        return self._write(work)

    # --- escrows funded by a named deposit (escrow.deposit_funding) ----------------------

    def fund_escrow_from_deposit(
        self,
        *,
        job_id: str,
        worker: str,
        chain: str,
        tx_hash: str,
        log_index: int | None = None,
        buyer: str | None = None,
        amount: int | None = None,
        fee_bps: int | None = None,
        expires_at: datetime | None = None,
    ) -> Escrow:
        """Fund `job_id` from one confirmed deposit (chain, tx hash and, when the
        transaction holds several, log/instruction index): its credited amount, or
        `amount` base units of it, moves from the depositing agent's balance into the
        escrow. A deposit funds one escrow at most; one still pending raises
        DepositPending (retry once it is confirmed)."""
        bps = self.settings.escrow.default_fee_bps if fee_bps is None else fee_bps
        ref = deposit_funding.DepositRef(chain, tx_hash, log_index)

        def work(s: Session) -> Escrow:
            escrow = deposit_funding.fund_escrow_from_deposit(
                s,
                job_id=job_id,
                deposit=ref,
                worker=service.get_agent(s, worker),
                buyer=None if buyer is None else service.get_agent(s, buyer),
                amount=amount,
                fee_bps=bps,
                expires_at=expires_at,
                actor="python",
            )
            return self._escrow_value(escrow)

        return self._write(work)

    def escrow_funding_deposit(self, job_id: str) -> FundingDeposit | None:
        """The deposit an escrow was funded from, with the depositor's address."""
        return self._read(
            lambda s: deposit_funding.funding_deposit(s, service.get_escrow(s, job_id))
        )

    # --- subscriptions (escrow.subscriptions) ------------------------------------------

    def _charge_policy(self) -> subscriptions.ChargePolicy:
        return subscriptions.ChargePolicy.of(self.settings.subscriptions)

    def create_subscription(
        self,
        *,
        subscription_id: str,
        buyer: str,
        asset: str,
        amount: int,
        interval: str,
        interval_count: int = 1,
        worker: str | None = None,
        fee_bps: int | None = None,
        starts_at: datetime | None = None,
    ) -> Subscription:
        """Authorize `amount` base units of `asset` from `buyer` every `interval_count`
        `interval`s (day, week, month), to `worker` minus the fee, or to the platform when
        no worker is named. Starting now (no `starts_at`) charges the first period at once
        and raises InsufficientFunds, creating nothing, when the buyer cannot cover it."""
        default_bps = self.settings.escrow.default_fee_bps if worker is not None else 0
        bps = default_bps if fee_bps is None else fee_bps

        def work(s: Session) -> Subscription:
            request = subscriptions.NewSubscription(
                external_id=subscription_id,
                buyer=service.get_agent(s, buyer),
                worker=None if worker is None else service.get_agent(s, worker),
                asset=asset,
                amount=amount,
                interval=interval,
                interval_count=interval_count,
                fee_bps=bps,
                starts_at=starts_at,
            )
            created = subscriptions.create_subscription(
                s, request, now=utcnow(), policy=self._charge_policy(), actor="python"
            )
            return subscription_value(s, created)

        return self._write(work)

    def get_subscription(self, subscription_id: str) -> Subscription:
        return self._read(
            lambda s: subscription_value(s, subscriptions.get_subscription(s, subscription_id))
        )

    def list_subscriptions(
        self,
        *,
        buyer: str | None = None,
        status: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[Subscription]:
        """Subscriptions in creation order after the row id `after_id` (a page)."""
        return self._read(
            lambda s: [
                subscription_value(s, row)
                for row in subscriptions.list_subscriptions(
                    s,
                    buyer=None if buyer is None else service.get_agent(s, buyer),
                    status=status,
                    after_id=after_id,
                    limit=limit,
                )
            ]
        )

    def subscription_charges(
        self, subscription_id: str, *, after_period: int | None = None, limit: int = 100
    ) -> list[SubscriptionCharge]:
        """A subscription's charges in period order (a page of at most `limit`)."""
        return self._read(
            lambda s: [
                charge_value(row)
                for row in subscriptions.list_charges(
                    s,
                    subscriptions.get_subscription(s, subscription_id),
                    after_period=after_period,
                    limit=limit,
                )
            ]
        )

    def cancel_subscription(
        self, subscription_id: str, *, requested_by: str = "marketplace"
    ) -> Subscription:
        """Stop charging for good; `requested_by` (buyer or marketplace) is recorded."""
        return self._write(
            lambda s: subscription_value(
                s,
                subscriptions.cancel_subscription(
                    s, subscription_id, requested_by=requested_by, now=utcnow(), actor="python"
                ),
            )
        )

    def resume_subscription(self, subscription_id: str) -> Subscription:
        """Reactivate a paused subscription, charging the current period now."""
        return self._write(
            lambda s: subscription_value(
                s,
                subscriptions.resume_subscription(
                    s, subscription_id, now=utcnow(), policy=self._charge_policy(), actor="python"
                ),
            )
        )

    def charge_due_subscriptions(self, now: datetime | None = None) -> subscriptions.ChargeRun:
        """What the daemon's `subscriptions` job does each tick, for a backend that runs
        no daemon: charge every subscription due by `now` (default: the current time)."""
        return subscriptions.charge_due(
            self._sessions,
            utcnow() if now is None else now,
            self._charge_policy(),
            limit=self.settings.subscriptions.batch_size,
        )


class AsyncEscrowService:
    """`EscrowService` for asyncio backends: the same calls, values and errors, each run
    on a thread of a pool of at most `max_workers` (give the engine a connection pool at
    least that large)."""

    def __init__(self, escrows: EscrowService, *, max_workers: int = DEFAULT_ASYNC_WORKERS):
        self.sync = escrows
        self._threads = ThreadPoolExecutor(max_workers, thread_name_prefix="escrowd")

    @classmethod
    def from_url(
        cls,
        database_url: str,
        settings: Settings | None = None,
        *,
        platform: PlatformAddresses | None = None,
        max_workers: int = DEFAULT_ASYNC_WORKERS,
    ) -> AsyncEscrowService:
        # A connection for every thread, so no call waits on the pool.
        engine = make_engine(database_url, pool_size=max_workers)
        return cls(EscrowService(engine, settings, platform=platform), max_workers=max_workers)

    async def _run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, partial(call, *args, **kwargs))

    async def aclose(self) -> None:
        """Wait for running calls, then close the pool and the engine."""
        await asyncio.get_running_loop().run_in_executor(None, self._threads.shutdown)
        self.sync.close()

    async def register_agent(self, external_id: str, name: str | None = None) -> Agent:
        return await self._run(self.sync.register_agent, external_id, name)

    async def get_agent(self, external_id: str) -> Agent:
        return await self._run(self.sync.get_agent, external_id)

    async def balances(self, external_id: str) -> list[Balance]:
        return await self._run(self.sync.balances, external_id)

    async def get_escrow(self, job_id: str) -> Escrow:
        return await self._run(self.sync.get_escrow, job_id)

    async def fund_escrow(
        self,
        *,
        job_id: str,
        buyer: str,
        worker: str,
        asset: str,
        amount: int,
        fee_bps: int | None = None,
        expires_at: datetime | None = None,
    ) -> Escrow:
        return await self._run(
            self.sync.fund_escrow,
            job_id=job_id,
            buyer=buyer,
            worker=worker,
            asset=asset,
            amount=amount,
            fee_bps=fee_bps,
            expires_at=expires_at,
        )

    async def release_escrow(self, job_id: str) -> Escrow:
        return await self._run(self.sync.release_escrow, job_id)

    async def refund_escrow(self, job_id: str) -> Escrow:
        return await self._run(self.sync.refund_escrow, job_id)

    async def resolve_escrow(self, job_id: str, worker_amount: int) -> Escrow:
        return await self._run(self.sync.resolve_escrow, job_id, worker_amount)

    async def expire_due_escrows(self, now: datetime, *, limit: int = 100) -> list[str]:
        return await self._run(self.sync.expire_due_escrows, now, limit=limit)

    async def withdraw(
        self,
        *,
        agent: str,
        asset: str,
        chain: str,
        to_address: str,
        amount: int,
        idempotency_key: str,
    ) -> Withdrawal:
        return await self._run(
            self.sync.withdraw,
            agent=agent,
            asset=asset,
            chain=chain,
            to_address=to_address,
            amount=amount,
            idempotency_key=idempotency_key,
        )

    async def fund_escrow_from_deposit(
        self,
        *,
        job_id: str,
        worker: str,
        chain: str,
        tx_hash: str,
        log_index: int | None = None,
        buyer: str | None = None,
        amount: int | None = None,
        fee_bps: int | None = None,
        expires_at: datetime | None = None,
    ) -> Escrow:
        return await self._run(
            self.sync.fund_escrow_from_deposit,
            job_id=job_id,
            worker=worker,
            chain=chain,
            tx_hash=tx_hash,
            log_index=log_index,
            buyer=buyer,
            amount=amount,
            fee_bps=fee_bps,
            expires_at=expires_at,
        )

    async def escrow_funding_deposit(self, job_id: str) -> FundingDeposit | None:
        return await self._run(self.sync.escrow_funding_deposit, job_id)

    async def create_subscription(
        self,
        *,
        subscription_id: str,
        buyer: str,
        asset: str,
        amount: int,
        interval: str,
        interval_count: int = 1,
        worker: str | None = None,
        fee_bps: int | None = None,
        starts_at: datetime | None = None,
    ) -> Subscription:
        return await self._run(
            self.sync.create_subscription,
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

    async def get_subscription(self, subscription_id: str) -> Subscription:
        return await self._run(self.sync.get_subscription, subscription_id)

    async def list_subscriptions(
        self,
        *,
        buyer: str | None = None,
        status: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
    ) -> list[Subscription]:
        return await self._run(
            self.sync.list_subscriptions, buyer=buyer, status=status, after_id=after_id, limit=limit
        )

    async def subscription_charges(
        self, subscription_id: str, *, after_period: int | None = None, limit: int = 100
    ) -> list[SubscriptionCharge]:
        return await self._run(
            self.sync.subscription_charges, subscription_id, after_period=after_period, limit=limit
        )

    async def cancel_subscription(
        self, subscription_id: str, *, requested_by: str = "marketplace"
    ) -> Subscription:
        return await self._run(
            self.sync.cancel_subscription, subscription_id, requested_by=requested_by
        )

    async def resume_subscription(self, subscription_id: str) -> Subscription:
        return await self._run(self.sync.resume_subscription, subscription_id)
