"""Signing and sending SOL and SPL (USDC) transfers from the Solana hot wallet.

The hot wallet is the fee payer of every transaction it signs (payouts and sweeps),
so it also pays the rent of a destination's associated token account, created in the
same transaction with the idempotent instruction when missing. A signature is final
once its transaction is finalized; it can never land once the finalized block height
is past the blockhash's last valid block height, which is the only moment a payout may
be signed again.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from solders.hash import Hash
from solders.instruction import Instruction
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
    transfer_checked,
)
from spl.token.models import TransferCheckedParams

from escrowd.indexer.errors import RpcError
from escrowd.indexer.sending import LandingVerdict, SignedTx, TxOutcome, TxState
from escrowd.indexer.solana_source import Commitment, SolanaSource
from escrowd.wallets.keystore import SolanaKey

log = structlog.get_logger(__name__)

# Blockhashes are taken at "confirmed": recent enough to leave most of the ~150-block
# validity window, and not from a fork that "processed" could still drop.
BLOCKHASH_COMMITMENT: Commitment = "confirmed"


def transfer_instructions(
    *,
    payer: Pubkey,
    source_owner: Pubkey,
    to: Pubkey,
    amount_base_units: int,
    mint: str | None,
    decimals: int,
    sources: Sequence[tuple[str, int]] = (),
) -> list[Instruction]:
    """A SOL transfer (mint None) or an SPL transfer_checked into the destination's
    associated token account, creating it when missing (paid by `payer`), from the
    source owner's ATA or, given `sources`, from those (token account, amount) pairs."""
    assert amount_base_units > 0
    if mint is None:
        return [
            transfer(
                TransferParams(from_pubkey=source_owner, to_pubkey=to, lamports=amount_base_units)
            )
        ]
    mint_key = Pubkey.from_string(mint)
    dest = get_associated_token_address(to, mint_key)
    ata = str(get_associated_token_address(source_owner, mint_key))
    assert not sources or sum(amount for _, amount in sources) == amount_base_units
    return [
        create_idempotent_associated_token_account(payer, to, mint_key),
        *(
            transfer_checked(
                TransferCheckedParams(
                    program_id=TOKEN_PROGRAM_ID,
                    source=Pubkey.from_string(account),
                    mint=mint_key,
                    dest=dest,
                    owner=source_owner,
                    amount=amount,
                    decimals=decimals,
                )
            )
            for account, amount in (sources or [(ata, amount_base_units)])
        ),
    ]


class SweepSourceShort(RpcError):
    """The deposit address's token accounts hold less than the sweep's amount now."""


def sweep_sources(
    source: SolanaSource, owner: str, mint: str, amount_base_units: int
) -> list[tuple[str, int]]:
    """The token accounts (any of the owner's, not only its ATA) a sweep of
    `amount_base_units` takes from, largest first, with the amount from each."""
    held = sorted(
        (
            (account.amount_base_units, account.address)
            for account in source.get_token_accounts_by_owner(owner, mint, "confirmed")
            if account.owner == owner and account.amount_base_units > 0
        ),
        reverse=True,
    )
    taken: list[tuple[str, int]] = []
    left = amount_base_units
    for balance, address in held:
        if left == 0:
            break
        taken.append((address, min(balance, left)))
        left -= taken[-1][1]
    if left:
        raise SweepSourceShort(
            f"{owner}'s token accounts of {mint} hold {amount_base_units - left}, "
            f"less than the sweep's {amount_base_units}"
        )
    return taken


class SolanaSender:
    def __init__(self, source: SolanaSource, key: SolanaKey, *, chain: str) -> None:
        self.source = source
        self.key = key
        self.chain = chain
        self._keypair = key.keypair()

    @property
    def address(self) -> str:
        return self.key.address

    def _sign(self, instructions: list[Instruction], extra_signers: Sequence[Keypair]) -> SignedTx:
        latest = self.source.get_latest_blockhash(BLOCKHASH_COMMITMENT)
        message = Message.new_with_blockhash(
            instructions, self._keypair.pubkey(), Hash.from_string(latest.blockhash)
        )
        vtx = VersionedTransaction(message, [self._keypair, *extra_signers])
        return SignedTx(
            tx_hash=str(vtx.signatures[0]),
            raw_tx=bytes(vtx),
            last_valid_block_height=latest.last_valid_block_height,
        )

    def sign_transfer(
        self, *, mint: str | None, decimals: int, to: str, amount_base_units: int
    ) -> SignedTx:
        """A payout from the hot wallet (fee payer and source)."""
        payer = self._keypair.pubkey()
        return self._sign(
            transfer_instructions(
                payer=payer,
                source_owner=payer,
                to=Pubkey.from_string(to),
                amount_base_units=amount_base_units,
                mint=mint,
                decimals=decimals,
            ),
            [],
        )

    def sign_sweep(
        self, source: Keypair, *, mint: str | None, decimals: int, amount_base_units: int
    ) -> SignedTx:
        """Move funds from a deposit address (`source` signs) into the hot wallet, which
        pays the fee; USDC from whichever of its token accounts hold it."""
        owner = str(source.pubkey())
        sources = [] if mint is None else sweep_sources(self.source, owner, mint, amount_base_units)
        return self._sign(
            transfer_instructions(
                payer=self._keypair.pubkey(),
                source_owner=source.pubkey(),
                to=self._keypair.pubkey(),
                amount_base_units=amount_base_units,
                mint=mint,
                decimals=decimals,
                sources=sources,
            ),
            [source],
        )

    def broadcast(self, raw_tx: bytes) -> str:
        return self.source.send_raw_transaction(raw_tx)

    def outcome(
        self,
        signatures: Sequence[str],
        *,
        last_valid_block_height: int | None,
        intended_lamports_delta: int,
    ) -> TxOutcome:
        """Finalized success or failure of any stored signature; EXPIRED when none is
        known and the finalized height is past the newest blockhash's validity.

        `intended_lamports_delta` is the change a successful transaction makes to the hot
        wallet's lamports on purpose (-amount for a SOL payout, +amount for a SOL sweep);
        the rest of the fee payer's balance change is network cost (fees, rent).
        """
        assert signatures
        # Height first: if it is already past the validity window, a signature absent
        # from the statuses read afterwards can never land.
        height = self.source.get_block_height("finalized")
        statuses = self.source.get_signature_statuses(signatures, search_transaction_history=True)
        for signature, status in zip(signatures, statuses, strict=True):
            if status is None:
                continue
            if status.confirmation_status != "finalized":
                return TxOutcome(TxState.PENDING, tx_hash=signature, block_number=status.slot)
            tx = self.source.get_transaction(signature, "finalized")
            assert tx is not None, "a finalized signature has its transaction"
            payer = tx.account_keys.index(self.address)
            spent = tx.pre_balances[payer] - tx.post_balances[payer]
            if status.err is None:
                return TxOutcome(
                    TxState.CONFIRMED,
                    tx_hash=signature,
                    block_number=status.slot,
                    network_cost_base_units=spent + intended_lamports_delta,
                )
            return TxOutcome(
                TxState.FAILED,
                tx_hash=signature,
                block_number=status.slot,
                error=f"transaction failed on chain: {status.err}",
                network_cost_base_units=spent,
            )
        if last_valid_block_height is not None and height > last_valid_block_height:
            return TxOutcome(TxState.EXPIRED)
        return TxOutcome(TxState.PENDING)


def landing_verdict(
    source: SolanaSource, *, signatures: Sequence[str], last_valid_block_height: int | None
) -> LandingVerdict:
    """Whether one of `signatures` can still land: none can once the finalized block
    height is past the newest blockhash's last valid height and the cluster knows none
    of them (read in that order, so a signature absent afterwards is absent for good)."""
    assert signatures
    height = source.get_block_height("finalized")
    statuses = source.get_signature_statuses(signatures, search_transaction_history=True)
    for signature, status in zip(signatures, statuses, strict=True):
        if status is not None:
            return LandingVerdict(
                True,
                f"signature {signature} is known to the cluster (slot {status.slot}, "
                f"{status.confirmation_status}, err {status.err}): `escrowd payouts retry` "
                "lets the worker settle the payout",
            )
    if last_valid_block_height is None or height <= last_valid_block_height:
        return LandingVerdict(
            True,
            f"the newest transaction's blockhash is valid until block height "
            f"{last_valid_block_height}, the finalized height is {height}: it may still land",
        )
    return LandingVerdict(
        False,
        f"the finalized block height {height} is past {last_valid_block_height}, the last "
        f"valid block height of the newest blockhash, and the cluster knows none of the "
        f"{len(signatures)} signatures: none can land any more",
    )
