"""Reconciliation: what custody addresses hold on chain against what the ledger says.

Per (chain, asset), with ledger balances as credits - debits:

    held_by_ledger = -balance(custody(chain, asset))
    in_flight      = balance(payouts_in_flight(chain, asset))
    on_chain       = sum of the balances of the hot wallet and every deposit address

Custody's balance is minus the coins held (a deposit debits custody), so the ledger
holds ``-custody``. A payout in flight is still in ``held_by_ledger`` until confirmed,
but its transfer may already have left, so the consistent range is

    held_by_ledger - in_flight <= on_chain <= held_by_ledger

and anything outside it is a difference (``on_chain - held_by_ledger`` when above,
``on_chain - (held_by_ledger - in_flight)`` when below). With no payout in flight this
is plain equality. Chain fees paid in an untracked coin (ETH gas) are not compared;
Solana fees and rent paid by the hot wallet in SOL are booked by the payout worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from escrowd.config.settings import Settings
from escrowd.escrow import accounts, ledger
from escrowd.models import AccountKind, Asset, Chain, DepositAddress, TransferCode

# (asset, addresses) -> total base units held by those addresses on chain.
BalanceReader = Callable[[Asset, Sequence[str]], int]


@dataclass(frozen=True)
class Difference:
    chain: str
    asset: str
    on_chain: int
    held_by_ledger: int
    in_flight: int
    difference: int

    def describe(self) -> str:
        return (
            f"{self.chain} {self.asset}: on chain {self.on_chain}, ledger holds "
            f"{self.held_by_ledger} with {self.in_flight} in flight: off by {self.difference}"
        )


@dataclass(frozen=True)
class Line:
    chain: str
    asset: str
    on_chain: int
    held_by_ledger: int
    in_flight: int

    @property
    def difference(self) -> int:
        if self.on_chain > self.held_by_ledger:
            return self.on_chain - self.held_by_ledger
        low = self.held_by_ledger - self.in_flight
        return self.on_chain - low if self.on_chain < low else 0


def custody_addresses(session: Session, family: str, hot_wallet: str) -> list[str]:
    """The hot wallet and every deposit address of a chain family ("evm" or "solana":
    one EVM deposit address serves every EVM network)."""
    deposit = session.scalars(
        select(DepositAddress.address)
        .where(DepositAddress.chain == family)
        .order_by(DepositAddress.id)
    ).all()
    return [hot_wallet, *deposit]


def reconcile_chain(
    session: Session,
    *,
    chain: str,
    addresses: Sequence[str],
    read_balance: BalanceReader,
) -> list[Line]:
    """One line per asset registered on `chain`."""
    lines = []
    for asset in session.scalars(select(Asset).where(Asset.chain == chain).order_by(Asset.id)):
        custody = ledger.find_account(session, AccountKind.CUSTODY, chain, asset.symbol)
        flight = ledger.find_account(session, AccountKind.PAYOUTS_IN_FLIGHT, chain, asset.symbol)
        lines.append(
            Line(
                chain=chain,
                asset=asset.symbol,
                on_chain=read_balance(asset, addresses),
                held_by_ledger=-ledger.balance(session, custody) if custody else 0,
                in_flight=ledger.balance(session, flight) if flight else 0,
            )
        )
    return lines


def differences(lines: Sequence[Line]) -> list[Difference]:
    return [
        Difference(
            chain=line.chain,
            asset=line.asset,
            on_chain=line.on_chain,
            held_by_ledger=line.held_by_ledger,
            in_flight=line.in_flight,
            difference=line.difference,
        )
        for line in lines
        if line.difference != 0
    ]


def record_operator_funding(
    session: Session, *, chain: str, asset: str, amount: int, reference: str
) -> None:
    """Book coins an operator put into a custody address outside any agent deposit (e.g.
    SOL for fees), so reconciliation expects them: custody -> operator funding."""
    ledger.post(
        session,
        [
            ledger.TransferSpec(
                idempotency_key=f"operator_funding:{chain}:{asset}:{reference}",
                debit_account_id=accounts.custody(session, chain, asset).id,
                credit_account_id=ledger.get_or_create_account(
                    session, AccountKind.GENERAL, f"operator_funding:{chain}", asset
                ).id,
                amount=amount,
                code=TransferCode.ADJUSTMENT,
                ref_type="operator_funding",
                ref_id=reference,
            )
        ],
        actor="operator",
    )


def reconcile_configured(
    session: Session, settings: Settings, hot_wallets: HotWallets
) -> list[Line]:
    """Lines for every configured chain, reading balances from its first RPC URL."""
    from escrowd.indexer.evm_source import JsonRpcEvmSource
    from escrowd.indexer.solana_source import SolanaRpcSource

    lines: list[Line] = []
    for evm in settings.evm_chains:
        with JsonRpcEvmSource.for_chain(evm) as source:

            def read_evm(
                asset: Asset, addresses: Sequence[str], src: JsonRpcEvmSource = source
            ) -> int:
                if asset.token_address is None:
                    return sum(src.native_balance_wei(a) for a in addresses)
                token = asset.token_address
                return sum(src.erc20_balance(token, a) for a in addresses)

            lines += reconcile_chain(
                session,
                chain=evm.name,
                addresses=custody_addresses(session, Chain.EVM, hot_wallets.evm),
                read_balance=read_evm,
            )
    if settings.solana is not None:
        sol = settings.solana
        with SolanaRpcSource(sol.rpc_urls, timeout_s=sol.rpc_timeout_s) as solana:

            def read_solana(asset: Asset, addresses: Sequence[str]) -> int:
                if asset.token_address is None:
                    return sum(solana.get_balance(a) for a in addresses)
                mint = asset.token_address
                return sum(
                    account.amount_base_units
                    for a in addresses
                    for account in solana.get_token_accounts_by_owner(a, mint)
                )

            lines += reconcile_chain(
                session,
                chain=sol.name,
                addresses=custody_addresses(session, Chain.SOLANA, hot_wallets.solana),
                read_balance=read_solana,
            )
    return lines


@dataclass(frozen=True)
class HotWallets:
    evm: str
    solana: str
