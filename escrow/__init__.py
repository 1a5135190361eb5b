"""Ledger, escrow state machine, payouts and the webhook outbox."""

from escrow.interface import EscrowService

__all__ = ["EscrowService"]
