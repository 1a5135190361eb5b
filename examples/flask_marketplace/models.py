"""The marketplace's own tables (seed 000's shape): agents and jobs, prices in USDC."""

import uuid
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import Numeric, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Agent(Base):
    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))


class Job(Base):
    __tablename__ = "jobs"

    task_id: Mapped[str] = mapped_column(
        String(36), primary_key=True, default=lambda: str(uuid.uuid4())
    )
    title: Mapped[str] = mapped_column(Text)
    price: Mapped[Decimal] = mapped_column(Numeric(20, 6))
    buyer_id: Mapped[str] = mapped_column(String(100))
    winner_id: Mapped[str] = mapped_column(String(100))
    # open -> funded -> resolved | cancelled
    status: Mapped[str] = mapped_column(String(20), default="open")
