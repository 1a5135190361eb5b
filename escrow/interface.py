"""`EscrowService`: the escrow use cases for a Python backend in the same process.

Each call is one transaction (retried on deadlock or serialization failure), with the
same semantics and errors as the HTTP API. Amounts are integers in base units. On
PostgreSQL, funding and settling an escrow are one database function call each, run as a
transaction of its own (`service.fund_escrow_alone`, `service.settle_escrow_alone`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import Unavailable
from escrowd.config.settings import Settings
from escrowd.escrow import deposit_funding, service, subscriptions
from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.payouts import PlatformAddresses, chain_family, minimum_payout
from escrowd.escrow.uow import in_transaction
from escrowd.models import Agent, Escrow, Payout, Subscription, SubscriptionCharge, utcnow
from escrowd.models.db import make_engine, make_session_factory

T = TypeVar("T")


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
        return self._write(lambda s: service.register_agent(s, external_id, name))

    def get_agent(self, external_id: str) -> Agent:
        return self._read(lambda s: service.get_agent(s, external_id))

    def _known_agent(self, external_id: str) -> Agent:
        return self._agents.get(external_id, self.get_agent)

    def balances(self, external_id: str) -> list[service.AssetBalance]:
        return self._read(lambda s: service.balances(s, service.get_agent(s, external_id)))

    def get_escrow(self, job_id: str) -> Escrow:
        return self._read(lambda s: service.get_escrow(s, job_id))

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
            return service.fund_escrow_alone(
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

        def work(s: Session) -> Escrow:
            return service.fund_escrow(
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

        return self._write(work)

    def release_escrow(self, job_id: str) -> Escrow:
        if self._one_call:
            return service.settle_escrow_alone(self.engine, job_id, service.RELEASE, actor="python")
        return self._write(lambda s: service.release_escrow(s, job_id, actor="python"))

    def refund_escrow(self, job_id: str) -> Escrow:
        if self._one_call:
            return service.settle_escrow_alone(self.engine, job_id, service.REFUND, actor="python")
        return self._write(lambda s: service.refund_escrow(s, job_id, actor="python"))

    def resolve_escrow(self, job_id: str, worker_amount: int) -> Escrow:
        if self._one_call:
            return service.settle_escrow_alone(
                self.engine, job_id, service.RESOLVE, worker_amount=worker_amount, actor="python"
            )
        return self._write(
            lambda s: service.resolve_escrow(s, job_id, worker_amount, actor="python")
        )

    def expire_due_escrows(self, now: datetime, *, limit: int = 100) -> list[str]:
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
    ) -> Payout:
        platform = self.platform
        if platform is None:
            raise Unavailable(
                "withdrawals need escrowd's own wallet addresses to refuse them as "
                "destinations: construct EscrowService with platform=PlatformAddresses(...)"
            )
        family = chain_family(self.settings, chain)
        minimum = minimum_payout(self.settings, asset)
        return self._write(
            lambda s: service.withdraw(
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
        )

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
            return deposit_funding.fund_escrow_from_deposit(
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

        return self._write(work)

    def escrow_funding_deposit(self, job_id: str) -> deposit_funding.FundingDeposit | None:
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
            return subscriptions.create_subscription(
                s, request, now=utcnow(), policy=self._charge_policy(), actor="python"
            )

        return self._write(work)

    def get_subscription(self, subscription_id: str) -> Subscription:
        return self._read(lambda s: subscriptions.get_subscription(s, subscription_id))

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
            lambda s: list(
                subscriptions.list_subscriptions(
                    s,
                    buyer=None if buyer is None else service.get_agent(s, buyer),
                    status=status,
                    after_id=after_id,
                    limit=limit,
                )
            )
        )

    def subscription_charges(
        self, subscription_id: str, *, after_period: int | None = None, limit: int = 100
    ) -> list[SubscriptionCharge]:
        """A subscription's charges in period order (a page of at most `limit`)."""
        return self._read(
            lambda s: list(
                subscriptions.list_charges(
                    s,
                    subscriptions.get_subscription(s, subscription_id),
                    after_period=after_period,
                    limit=limit,
                )
            )
        )

    def cancel_subscription(
        self, subscription_id: str, *, requested_by: str = "marketplace"
    ) -> Subscription:
        """Stop charging for good; `requested_by` (buyer or marketplace) is recorded."""
        return self._write(
            lambda s: subscriptions.cancel_subscription(
                s, subscription_id, requested_by=requested_by, now=utcnow(), actor="python"
            )
        )

    def resume_subscription(self, subscription_id: str) -> Subscription:
        """Reactivate a paused subscription, charging the current period now."""
        return self._write(
            lambda s: subscriptions.resume_subscription(
                s, subscription_id, now=utcnow(), policy=self._charge_policy(), actor="python"
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
