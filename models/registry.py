"""The asset registry: each token per chain with its decimals, created on first use, and
the one scale the ledger keeps each asset at (`ledger_decimals`)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from escrowd.config.settings import LEDGER_DECIMALS
from escrowd.models.chain import Asset


class AssetRegistryConflict(Exception):
    """The configured asset disagrees with the one already registered."""


def ledger_decimals(symbol: str) -> int:
    """Decimals of the ledger's base unit for `symbol` (USDC: 6, SOL: 9), whatever the
    decimals of its token on each chain."""
    scale = LEDGER_DECIMALS.get(symbol)
    if scale is None:
        known = ", ".join(sorted(LEDGER_DECIMALS))
        raise AssetRegistryConflict(f"{symbol} has no ledger scale; known assets: {known}")
    return scale


def ensure_asset(
    session: Session, *, chain: str, symbol: str, decimals: int, token_address: str | None
) -> Asset:
    scale = LEDGER_DECIMALS.get(symbol)
    if scale is not None and decimals < scale:
        raise AssetRegistryConflict(
            f"{symbol} on {chain} with {decimals} decimals is coarser than the ledger's "
            f"{scale}: its amounts cannot all be paid out there"
        )
    asset = find_asset(session, chain, symbol)
    if asset is None:
        try:
            with session.begin_nested():
                asset = Asset(
                    chain=chain, symbol=symbol, decimals=decimals, token_address=token_address
                )
                session.add(asset)
            return asset
        except IntegrityError:
            # Registered meanwhile by another poller starting on the same database.
            asset = find_asset(session, chain, symbol)
            assert asset is not None, "the asset that conflicted is there"
    if asset.decimals != decimals or (asset.token_address or None) != (token_address or None):
        raise AssetRegistryConflict(
            f"{symbol} on {chain} is registered with decimals {asset.decimals} and token "
            f"{asset.token_address}, but configured with {decimals} and {token_address}; "
            "fix the configuration (a token's identity cannot change under existing balances)"
        )
    return asset


def find_asset(session: Session, chain: str, symbol: str) -> Asset | None:
    return session.scalars(
        select(Asset).where(Asset.chain == chain, Asset.symbol == symbol)
    ).one_or_none()
