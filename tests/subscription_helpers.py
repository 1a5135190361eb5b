"""Builders shared by the subscription tests."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.models import Subscription, SubscriptionCharge


def age(sessions: sessionmaker[Session], external_id: str, delta: timedelta) -> None:
    """Time passes for one subscription: its stored times move `delta` into the past, so
    the code under test runs at the real current time."""
    with sessions() as s, s.begin():
        sub = s.scalars(select(Subscription).where(Subscription.external_id == external_id)).one()
        sub.anchor_at -= delta
        sub.next_charge_at -= delta
        for charge in s.scalars(
            select(SubscriptionCharge).where(SubscriptionCharge.subscription_id == sub.id)
        ):
            charge.period_start -= delta
