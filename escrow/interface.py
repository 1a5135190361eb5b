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
from escrowd.escrow import service
from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.payouts import PlatformAddresses, chain_family, minimum_payout
from escrowd.escrow.uow import in_transaction
from escrowd.models import Agent, Escrow, Payout
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
