"""HTTP route of escrows funded from one named deposit: POST /v1/deposit-funded-escrows
(escrow.deposit_funding), and the `funded_from_deposit` part of every escrow's answer.

Mounted by daemon.api.create_app on its /v1 router, with the API's escrow renderer.
"""

# No `from __future__ import annotations`: FastAPI must see the route signatures evaluated.
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from escrowd.daemon.api_deps import (
    IdempotencyKeyHeader,
    Outcome,
    WriteKey,
    in_future,
    mutate,
    state_of,
)
from escrowd.daemon.api_schemas import (
    DecimalString,
    EscrowDepositOut,
    EscrowOut,
    ExternalId,
    NetworkName,
    Timestamp,
)
from escrowd.escrow import deposit_funding, service
from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.money import parse_amount
from escrowd.models import Escrow

RenderEscrow = Callable[[Session, Escrow, AgentCache], EscrowOut]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DepositName(_Body):
    network: NetworkName = Field(
        description="The network the deposit was seen on, as in /v1/deposits."
    )
    tx_hash: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[0-9A-Za-z]+$")] = Field(
        description="EVM transaction hash (0x...) or Solana transaction signature."
    )
    log_index: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = Field(
        default=None,
        description="The deposit's log index (EVM) or index (Solana) as /v1/deposits shows "
        "it; needed only when the transaction holds several deposits.",
    )


class EscrowFromDeposit(_Body):
    job_id: ExternalId
    worker: ExternalId
    deposit: DepositName
    buyer: ExternalId | None = Field(
        default=None,
        description="Optional check: the agent the deposit was credited to (the buyer).",
    )
    amount: DecimalString | None = Field(
        default=None,
        description="Part of the deposit to hold (default: all it credited); the rest "
        "stays the buyer's available balance. The deposit funds no other escrow either way.",
    )
    fee_bps: Annotated[int, Field(ge=0, le=10_000)] | None = Field(
        default=None, description="Platform fee in basis points; defaults to the configured fee."
    )
    expires_at: Timestamp | None = Field(
        default=None, description="When the escrow expires (and is refunded); in the future."
    )


def deposit_out(session: Session, escrow: Escrow) -> EscrowDepositOut | None:
    found = deposit_funding.funding_deposit(session, escrow)
    if found is None:
        return None
    return EscrowDepositOut(
        deposit_id=found.deposit_id,
        network=found.chain,
        tx_hash=found.tx_hash,
        log_index=found.log_index,
        depositor_address=found.depositor_address,
    )


def install(router: APIRouter, render_escrow: RenderEscrow) -> None:
    """Add the route to the API's /v1 router; `render_escrow` is the API's EscrowOut."""

    @router.post(
        "/deposit-funded-escrows", status_code=201, response_model=EscrowOut, tags=["escrows"]
    )
    def create_escrow_from_deposit(
        request: Request, body: EscrowFromDeposit, principal: WriteKey, key: IdempotencyKeyHeader
    ) -> Response:
        """Fund an escrow from one confirmed deposit, named by network and tx hash: the
        agent it was credited to is the buyer. A deposit funds one escrow at most (409
        `deposit_used`); a deposit not confirmed yet answers 409 `deposit_pending` (send
        the same request again later), an unknown one 404 `deposit_not_found`."""
        state = state_of(request)
        settings = state.settings
        named = body.deposit
        ref = deposit_funding.DepositRef(named.network, named.tx_hash, named.log_index)

        def work(s: Session) -> Outcome:
            buyer = None if body.buyer is None else state.agent(body.buyer)
            amount = None
            if body.amount is not None:
                asset = deposit_funding.deposit_asset(s, ref, buyer)
                amount = parse_amount(body.amount, service.asset_decimals(s, asset))
            escrow = deposit_funding.fund_escrow_from_deposit(
                s,
                job_id=body.job_id,
                deposit=ref,
                worker=state.agent(body.worker),
                buyer=buyer,
                amount=amount,
                fee_bps=(settings.escrow.default_fee_bps if body.fee_bps is None else body.fee_bps),
                expires_at=in_future(body.expires_at, "expires_at"),
                actor=f"apikey:{principal.prefix}",
            )
            return 201, render_escrow(s, escrow, state.agents).model_dump(mode="json")

        return mutate(request, principal, key, body, work)


__all__ = ["deposit_out", "install"]
