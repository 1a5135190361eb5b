"""Append-only, hash-chained audit trail.

Rows are chained per stream (one escrow, one deposit, one payout...), so unrelated writers
never wait on one global chain head. ``audit_heads`` holds each stream's last sequence
number and hash; checkpoint rows (stream ``checkpoint``) anchor a digest of every head so a
deleted stream or a cut-off tail is detected too.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from escrowd.models.base import Base, BigIntPK, utcnow


class AuditLog(Base):
    __tablename__ = "audit_log"
    __table_args__ = (UniqueConstraint("stream", "seq"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    stream: Mapped[str] = mapped_column(String(160))
    seq: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    asset: Mapped[str | None] = mapped_column(String(16))
    amount: Mapped[int | None]
    # Canonical JSON (sorted keys) of references: accounts, tx hashes, ids.
    details: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    __tablename__ = "audit_heads"

    stream: Mapped[str] = mapped_column(String(160), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    row_hash: Mapped[str] = mapped_column(String(64))
