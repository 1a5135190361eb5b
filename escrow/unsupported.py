"""Unsupported deposits: ERC-20 tokens other than USDC that arrived at deposit addresses.

They are never credited. The indexer's token scan (indexer/evm_tokens.py) stores each one
and hands it here, in its transaction: an audit row per deposit (stream
``unsupported-deposits:<chain>``) and a ``deposit.unsupported`` webhook event naming the
agent by the marketplace's id. `list_unsupported_deposits` is the read the API and the
CLI show; `escrowd tokens recover` moves such a token out (escrow/token_recovery.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from escrowd.escrow import audit, events
from escrowd.models import Agent, UnsupportedDeposit

log = structlog.get_logger(__name__)


def unsupported_deposit_data(deposit: UnsupportedDeposit, agent: str) -> dict[str, object]:
    """What the webhook event and the API say about one (``agent``: its external id)."""
    return {
        "unsupported_deposit_id": deposit.id,
        "agent": agent,
        "network": deposit.chain,
        "token_address": deposit.token_address,
        "amount_base_units": deposit.amount_base_units,
        "tx_hash": deposit.tx_hash,
        "log_index": deposit.log_index,
        "block_number": deposit.block_number,
        "from_address": deposit.from_address,
        "to_address": deposit.to_address,
        "recovery_id": deposit.recovery_id,
    }


def _external_ids(session: Session, agent_ids: set[int]) -> dict[int, str]:
    return dict(
        session.execute(select(Agent.id, Agent.external_id).where(Agent.id.in_(agent_ids))).all()
    )


class UnsupportedDepositRecorder:
    """The escrow side of `indexer.evm_tokens.UnsupportedSink`."""

    def recorded(self, session: Session, deposits: Sequence[UnsupportedDeposit]) -> None:
        if not deposits:
            return
        agents = _external_ids(session, {d.agent_id for d in deposits})
        for chain in sorted({d.chain for d in deposits}):
            audit.append_bulk(
                session,
                f"unsupported-deposits:{chain}",
                [
                    audit.Entry(
                        actor="indexer",
                        action="unsupported_deposit_seen",
                        # The amount may exceed BIGINT (any uint256): kept in the details.
                        details=unsupported_deposit_data(d, agents[d.agent_id]),
                    )
                    for d in deposits
                    if d.chain == chain
                ],
            )
        events.emit_many(
            session,
            [
                ("deposit.unsupported", unsupported_deposit_data(d, agents[d.agent_id]))
                for d in deposits
            ],
        )
        for d in deposits:
            log.warning(
                "unsupported_deposit",
                chain=d.chain,
                token_address=d.token_address,
                to_address=d.to_address,
                amount_base_units=d.amount_base_units,
                tx_hash=d.tx_hash,
            )


@dataclass(frozen=True)
class UnsupportedDepositView:
    deposit: UnsupportedDeposit
    agent: str

    def data(self) -> dict[str, object]:
        return unsupported_deposit_data(self.deposit, self.agent)


def list_unsupported_deposits(
    session: Session,
    *,
    chain: str | None = None,
    agent_id: int | None = None,
    address: str | None = None,
    after_id: int = 0,
    limit: int = 100,
) -> list[UnsupportedDepositView]:
    """Unsupported deposits in id order after ``after_id`` (cursor pagination), filtered by
    network, agent or deposit address; ``limit`` at most 1000."""
    query = (
        select(UnsupportedDeposit, Agent.external_id)
        .join(Agent, Agent.id == UnsupportedDeposit.agent_id)
        .where(UnsupportedDeposit.id > after_id)
        .order_by(UnsupportedDeposit.id)
        .limit(max(1, min(limit, 1000)))
    )
    if chain is not None:
        query = query.where(UnsupportedDeposit.chain == chain)
    if agent_id is not None:
        query = query.where(UnsupportedDeposit.agent_id == agent_id)
    if address is not None:
        query = query.where(UnsupportedDeposit.to_address == address)
    return [UnsupportedDepositView(row, external) for row, external in session.execute(query)]
