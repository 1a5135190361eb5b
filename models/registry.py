"""The asset registry: each token per chain with its decimals, created on first use."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from escrowd.models.chain import Asset


class AssetRegistryConflict(Exception):
    """The configured asset disagrees with the one already registered."""


def ensure_asset(
    session: Session, *, chain: str, symbol: str, decimals: int, token_address: str | None
) -> Asset:
    asset = session.scalars(
        select(Asset).where(Asset.chain == chain, Asset.symbol == symbol)
    ).one_or_none()
    if asset is None:
        with session.begin_nested():
            asset = Asset(
                chain=chain, symbol=symbol, decimals=decimals, token_address=token_address
            )
            session.add(asset)
        return asset
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
