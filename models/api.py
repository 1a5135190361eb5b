"""API keys, idempotency records and the webhook outbox."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from escrowd.models.base import ApiScope, Base, BigIntPK, DeliveryStatus, check_in, utcnow

# A key's own limit is both values or neither.
RATE_LIMIT_CHECK = (
    "(rate_limit_requests IS NULL AND rate_limit_window_s IS NULL) OR "
    "(rate_limit_requests > 0 AND rate_limit_window_s > 0)"
)


class ApiKey(Base):
    """Only a hash of the key is stored; `prefix` is its public, indexed part."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(check_in("scope", ApiScope), name="scope_valid"),
        CheckConstraint(RATE_LIMIT_CHECK, name="rate_limit_valid"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(128))
    scope: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    # Requests per window of this key; both NULL: the [api] rate_limit default.
    rate_limit_requests: Mapped[int | None] = mapped_column(Integer)
    rate_limit_window_s: Mapped[int | None] = mapped_column(Integer)


class ApiRateWindow(Base):
    """One row per key: the requests counted in its current fixed window (escrow/ratelimit).
    UNLOGGED on PostgreSQL: a crash may forget counts, never money."""

    __tablename__ = "api_rate_windows"

    api_key_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("api_keys.id"), primary_key=True)
    # Unix time (seconds) the window began, a multiple of its length.
    window_start: Mapped[int] = mapped_column(BigInteger)
    # Requests granted in the window, plus one per refused claim past the limit.
    request_count: Mapped[int] = mapped_column(BigInteger)
    # What the last claim was granted (0: refused); see escrow/ratelimit.
    granted: Mapped[int] = mapped_column(BigInteger, server_default="0")


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("principal", "key"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    principal: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(500))
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEndpoint(Base):
    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    url: Mapped[str] = mapped_column(String(2000))
    # Signing secret, encrypted at rest (AEAD); never stored or returned in plain text.
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    # JSON list of event types, or ["*"].
    event_types: Mapped[str] = mapped_column(Text, default='["*"]')
    enabled: Mapped[bool] = mapped_column(default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]


class WebhookEvent(Base):
    """The outbox: written in the same transaction as the change it reports."""

    __tablename__ = "webhook_events"
    __table_args__ = (
        # The fan-out's backlog only (migration 0018): an index of the flag left every
        # event ever written in the fan-out's path.
        Index(
            "ix_webhook_events_to_fan_out",
            "id",
            postgresql_where=text("NOT fanned_out"),
            sqlite_where=text("fanned_out = 0"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    api_version: Mapped[str] = mapped_column(String(16))
    payload: Mapped[str] = mapped_column(Text)
    fanned_out: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id"),
        CheckConstraint(check_in("status", DeliveryStatus), name="status_valid"),
        Index("ix_webhook_deliveries_endpoint_status_id", "endpoint_id", "status", "id"),
        Index("ix_webhook_deliveries_status_next_attempt", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id"))
    event_id: Mapped[int] = mapped_column(ForeignKey("webhook_events.id"))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookAttempt(Base):
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(500))
    duration_ms: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
