"""The marketplace's own tables (seed 001's shape), for SQLAlchemy's asyncio engine."""

import uuid
from datetime import UTC, datetime

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Agent(Base):
    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(100))


class Job(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(
        String(36), primary_key=True, default=lambda: str(uuid.uuid4())
    )
    client_id: Mapped[str] = mapped_column(String(100))
    seller_id: Mapped[str] = mapped_column(String(100))
    price: Mapped[str] = mapped_column(String(40))  # decimal string in the asset's units
    # proposed -> funded -> completed | refunded, moved by escrowd's webhooks
    status: Mapped[str] = mapped_column(String(20), default="proposed")
    seller_paid_base_units: Mapped[int | None]


class WebhookReceipt(Base):
    """Events already applied: escrowd delivers at least once."""

    __tablename__ = "webhook_receipts"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(40))
    received_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))
