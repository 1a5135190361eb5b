"""The platform's own wallets: what each holds on chain, what it needs and why, and the
booking of coins operators put in or take out.

Wallets (per configured chain):
- EVM hot wallet: signs every payout. Needs ETH for gas and a USDC float: a payout is
  paid from it, while deposits sit in deposit addresses until a sweep moves them here.
- EVM gas wallet: sends each deposit address the ETH for its sweep. Needs ETH only.
- Solana hot wallet: signs and pays the fees of every payout and sweep, and the rent of a
  recipient's USDC token account when a payout creates it. Needs SOL, and a float of
  each asset it pays out.

Coins an operator sends to a custody address (the hot wallets) outside any agent deposit
must be booked (`book_funding`), or reconcile reports them as a difference; taking float
back out is booked with `book_withdrawal`. ETH is not a ledger asset: gas is not booked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from escrowd.config.settings import EvmChainSettings, Settings, SettingsError, SolanaSettings
from escrowd.escrow import reconcile
from escrowd.escrow.errors import InsufficientFunds
from escrowd.escrow.money import format_amount, parse_amount
from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_sender import ERC20_TRANSFER_GAS, NATIVE_TRANSFER_GAS
from escrowd.indexer.evm_source import EvmSource
from escrowd.indexer.solana_source import SolanaSource
from escrowd.models import Asset, LedgerTransfer, Payout, PayoutReason
from escrowd.models.registry import ensure_asset, find_asset
from escrowd.wallets.addresses import associated_token_address

ETH_DECIMALS = 18
SOL_DECIMALS = 9
# A sweep costs the gas wallet its own transfer plus twice one USDC transfer's gas (the
# margin escrow.sweeps sends).
SWEEP_FUNDING_GAS = NATIVE_TRANSFER_GAS + 2 * ERC20_TRANSFER_GAS


@dataclass(frozen=True)
class Holding:
    asset: str
    base_units: int
    decimals: int
    # Booked into custody by operators and not taken out (None: not a ledger asset).
    booked_float: int | None = None

    def describe(self) -> str:
        text = f"{format_amount(self.base_units, self.decimals)} {self.asset}"
        if self.booked_float is not None:
            booked = format_amount(self.booked_float, self.decimals)
            text += f" (booked operator float {booked} {self.asset})"
        return text


@dataclass
class WalletStatus:
    chain: str
    role: str
    address: str
    holdings: list[Holding] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


def _open_payouts(session: Session, chain: str, asset_id: int) -> int:
    """What payouts not yet sent will take from the hot wallet (sweeps bring, not take)."""
    total = session.scalar(
        select(func.sum(Payout.amount)).where(
            Payout.chain == chain,
            Payout.asset_id == asset_id,
            Payout.reason != PayoutReason.SWEEP.value,
            Payout.status.in_(reconcile.OPEN_PAYOUT_STATES[:2]),
        )
    )
    return int(total or 0)


def _float_warning(
    session: Session, chain: str, asset: Asset | None, held: int, decimals: int
) -> str | None:
    if asset is None:
        return None
    owed = _open_payouts(session, chain, asset.id)
    if held >= owed:
        return None
    return (
        f"{asset.symbol} float {format_amount(held, decimals)} is below the "
        f"{format_amount(owed, decimals)} {asset.symbol} of payouts waiting to be sent: "
        "they wait until a sweep or a funding brings it"
    )


def evm_status(
    session: Session,
    chain: EvmChainSettings,
    source: EvmSource,
    *,
    hot_wallet: str,
    gas_wallet: str,
    reserve_transactions: int,
) -> list[WalletStatus]:
    hot = WalletStatus(chain.name, "EVM hot wallet", hot_wallet)
    gas = WalletStatus(chain.name, "EVM gas wallet", gas_wallet)
    hot.needs = [
        f"ETH: gas for every payout (up to {ERC20_TRANSFER_GAS:,} gas each)",
        "USDC: a float to pay out from; deposits reach it only when swept",
    ]
    gas.needs = [
        "ETH: the gas it sends each deposit address before its sweep "
        f"(up to {SWEEP_FUNDING_GAS:,} gas each)"
    ]
    try:
        gas_price = source.gas_price_wei()
        hot_eth = source.native_balance_wei(hot_wallet)
        gas_eth = source.native_balance_wei(gas_wallet)
        hot_usdc = source.erc20_balance(chain.usdc_address, hot_wallet)
    except RpcError as exc:
        for wallet in (hot, gas):
            wallet.error = f"{type(exc).__name__}: {exc}"
        return [hot, gas]
    asset = find_asset(session, chain.name, "USDC")
    hot.holdings = [
        Holding("ETH", hot_eth, ETH_DECIMALS),
        Holding(
            "USDC",
            hot_usdc,
            chain.usdc_decimals,
            reconcile.operator_float(session, chain.name, "USDC"),
        ),
    ]
    gas.holdings = [Holding("ETH", gas_eth, ETH_DECIMALS)]
    for wallet, balance, gas_each, what in (
        (hot, hot_eth, ERC20_TRANSFER_GAS, "payouts"),
        (gas, gas_eth, SWEEP_FUNDING_GAS, "sweeps"),
    ):
        covered = balance // max(1, gas_each * gas_price)
        if balance == 0:
            wallet.warnings.append(f"no ETH: every one of its {what} on {chain.name} fails")
        elif covered < reserve_transactions:
            wallet.warnings.append(
                f"ETH pays for about {covered} {what} at the current gas price "
                f"({gas_price} wei); keep at least {reserve_transactions}"
            )
    warning = _float_warning(session, chain.name, asset, hot_usdc, chain.usdc_decimals)
    if warning is not None:
        hot.warnings.append(warning)
    return [hot, gas]


def solana_status(
    session: Session,
    solana: SolanaSettings,
    source: SolanaSource,
    *,
    hot_wallet: str,
    reserve_transactions: int,
) -> list[WalletStatus]:
    hot = WalletStatus(solana.name, "Solana hot wallet", hot_wallet)
    try:
        rent = source.get_minimum_balance_for_rent_exemption(reconcile.SPL_TOKEN_ACCOUNT_BYTES)
        sol = source.get_balance(hot_wallet, "confirmed")
        usdc = sum(
            account.amount_base_units
            for account in source.get_token_accounts_by_owner(
                hot_wallet, solana.usdc_mint, "confirmed"
            )
        )
    except RpcError as exc:
        hot.error = f"{type(exc).__name__}: {exc}"
        return [hot]
    per_transaction = reconcile.SOLANA_FEE_LAMPORTS + rent
    hot.needs = [
        "SOL: the fee of every payout and sweep, and the rent of a recipient's USDC token "
        f"account a payout creates (up to {format_amount(per_transaction, SOL_DECIMALS)} SOL "
        "each)",
        "USDC and SOL: a float to pay out from; deposits reach it only when swept",
        f"its USDC token account: {associated_token_address(hot_wallet, solana.usdc_mint)}",
    ]
    hot.holdings = [
        Holding("SOL", sol, SOL_DECIMALS, reconcile.operator_float(session, solana.name, "SOL")),
        Holding("USDC", usdc, 6, reconcile.operator_float(session, solana.name, "USDC")),
    ]
    covered = sol // per_transaction
    if sol == 0:
        hot.warnings.append(
            "no SOL: every Solana payout and sweep fails (the network refuses a fee payer "
            "without funds)"
        )
    elif covered < reserve_transactions:
        hot.warnings.append(
            f"SOL pays for about {covered} payouts or sweeps; keep at least {reserve_transactions}"
        )
    for symbol, held, decimals in (("SOL", sol, SOL_DECIMALS), ("USDC", usdc, 6)):
        warning = _float_warning(
            session, solana.name, find_asset(session, solana.name, symbol), held, decimals
        )
        if warning is not None:
            hot.warnings.append(warning)
    return [hot]


# --- booking operator funding ------------------------------------------------------------


@dataclass(frozen=True)
class Booked:
    chain: str
    asset: str
    amount: int
    decimals: int
    float_after: int
    already: bool

    def describe(self, what: str) -> str:
        verb = "already booked" if self.already else "booked"
        return (
            f"{verb}: {what} of {format_amount(self.amount, self.decimals)} {self.asset} on "
            f"{self.chain}; operator float now "
            f"{format_amount(self.float_after, self.decimals)} {self.asset}"
        )


def custody_asset(session: Session, settings: Settings, chain: str, symbol: str) -> Asset:
    """The ledger asset of a configured chain, registered from the settings if no poller
    has done so yet (a fresh database can be funded before the first poll)."""
    found = find_asset(session, chain, symbol)
    if found is not None:
        return found
    for evm in settings.evm_chains:
        if evm.name == chain and symbol == "USDC":
            return ensure_asset(
                session,
                chain=chain,
                symbol="USDC",
                decimals=evm.usdc_decimals,
                token_address=evm.usdc_address,
            )
    solana = settings.solana
    if solana is not None and solana.name == chain and symbol in ("USDC", "SOL"):
        return ensure_asset(
            session,
            chain=chain,
            symbol=symbol,
            decimals=6 if symbol == "USDC" else SOL_DECIMALS,
            token_address=solana.usdc_mint if symbol == "USDC" else None,
        )
    known = reconcile.configured_chains(settings)
    if chain not in known:
        raise SettingsError(f"unknown chain {chain!r} (configured: {', '.join(known) or 'none'})")
    assets = "USDC" if chain != (solana.name if solana else None) else "USDC, SOL"
    raise SettingsError(f"{symbol} is not a ledger asset on {chain} (assets: {assets})")


def _already(session: Session, key: str) -> bool:
    query = select(LedgerTransfer.id).where(LedgerTransfer.idempotency_key == key)
    return session.scalar(query) is not None


def book(
    session: Session,
    settings: Settings,
    *,
    chain: str,
    symbol: str,
    amount: str,
    reference: str,
    withdrawal: bool,
) -> Booked:
    """Book an operator's funding (or, `withdrawal`, taking float back out) of a custody
    wallet, in the caller's transaction. `amount` is a decimal string; `reference` (the
    ticket or transaction it came from) makes a repeat a no-op."""
    if not reference.strip():
        raise SettingsError("--reference must name the funding (a ticket or transaction id)")
    asset = custody_asset(session, settings, chain, symbol)
    base_units = parse_amount(amount, asset.decimals)
    prefix = "operator_withdrawal" if withdrawal else "operator_funding"
    already = _already(session, f"{prefix}:{chain}:{symbol}:{reference}")
    if withdrawal:
        available = reconcile.operator_float(session, chain, symbol)
        if not already and base_units > available:
            raise InsufficientFunds(
                f"withdrawal of {amount} {symbol} exceeds the operator float booked on {chain} "
                f"({format_amount(available, asset.decimals)} {symbol}); only booked float "
                "can be taken out"
            )
        reconcile.record_operator_withdrawal(
            session, chain=chain, asset=symbol, amount=base_units, reference=reference
        )
    else:
        reconcile.record_operator_funding(
            session, chain=chain, asset=symbol, amount=base_units, reference=reference
        )
    return Booked(
        chain=chain,
        asset=symbol,
        amount=base_units,
        decimals=asset.decimals,
        float_after=reconcile.operator_float(session, chain, symbol),
        already=already,
    )
