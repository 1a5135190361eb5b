"""Signing and sending ERC-20 (USDC) transfers from an escrowd-owned EVM address.

escrowd owns each sender's nonce: `allocate_nonce` takes it from `sender_nonces` in the
caller's transaction (initialised from the node's pending count the first time), so the
nonce, the signed bytes and their hash commit together before anything is broadcast.
A stuck transaction is replaced with the same nonce and fees raised by at least 12.5 %
on both fields (nodes require 10 %), never above the configured cap. Whichever of a
payout's transactions gets mined settles it: they share one nonce, so at most one can.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import rlp
import structlog
from coincurve import PrivateKey
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_source import EvmSource
from escrowd.indexer.sending import LandingVerdict, SignedTx, TxOutcome, TxState
from escrowd.models import SenderNonce
from escrowd.wallets.keystore import EvmKey

log = structlog.get_logger(__name__)

GWEI = 10**9
# transfer(address,uint256)
_TRANSFER_SELECTOR = bytes.fromhex("a9059cbb")
# A USDC transfer to a fresh holder costs ~52k gas; the margin covers proxy tokens.
ERC20_TRANSFER_GAS = 100_000
NATIVE_TRANSFER_GAS = 21_000
# Replacement fee bump as a fraction: new >= old * 9 / 8 (12.5 %).
_BUMP_NUM, _BUMP_DEN = 9, 8
FEE_HISTORY_BLOCKS = 5
FEE_PERCENTILE = 50.0
FEE_QUOTE_TTL_S = 2.0


class FeeCapExceeded(RpcError):
    """The fee the chain asks for is above `max_fee_gwei`; raise the cap or wait."""


def erc20_transfer_data(to: str, amount_base_units: int) -> bytes:
    assert 0 < amount_base_units < 2**256
    recipient = bytes.fromhex(to_checksum_address(to)[2:])
    return _TRANSFER_SELECTOR + recipient.rjust(32, b"\0") + amount_base_units.to_bytes(32, "big")


@dataclass(frozen=True, slots=True)
class Fees:
    max_fee_per_gas: int
    max_priority_fee_per_gas: int


def quote_fees(source: EvmSource, cap_wei: int) -> Fees:
    """EIP-1559 fees: twice the next block's base fee plus the median recent tip,
    bounded by `cap_wei`. Raises FeeCapExceeded when the base fee alone exceeds it."""
    history = source.fee_history(FEE_HISTORY_BLOCKS, [FEE_PERCENTILE])
    next_base = history.base_fee_per_gas_wei[-1]
    tips = sorted(row[0] for row in history.reward_wei if row)
    tip = tips[len(tips) // 2] if tips else source.max_priority_fee_wei()
    tip = max(tip, 1)
    if next_base + tip > cap_wei:
        raise FeeCapExceeded(
            f"base fee {next_base} wei + tip {tip} wei is above the cap of {cap_wei} wei; "
            "raise max_fee_gwei or wait for fees to fall"
        )
    max_fee = min(2 * next_base + tip, cap_wei)
    return Fees(max_fee_per_gas=max_fee, max_priority_fee_per_gas=tip)


def bumped_fees(old: Fees, current: Fees, cap_wei: int) -> Fees | None:
    """Fees for a replacement: both fields >= +12.5 % and at least what the chain asks
    now. None when that would exceed the cap (keep waiting on the old transaction)."""
    tip = max(
        -(-old.max_priority_fee_per_gas * _BUMP_NUM // _BUMP_DEN), current.max_priority_fee_per_gas
    )
    max_fee = max(-(-old.max_fee_per_gas * _BUMP_NUM // _BUMP_DEN), current.max_fee_per_gas, tip)
    if max_fee > cap_wei:
        return None
    return Fees(max_fee_per_gas=max_fee, max_priority_fee_per_gas=tip)


def decode_fees(raw_tx: bytes) -> tuple[int, Fees]:
    """(nonce, fees) of a signed EIP-1559 transaction."""
    assert raw_tx[0] == 2, "not an EIP-1559 transaction"
    fields = rlp.decode(raw_tx[1:])
    nonce, tip, max_fee = (int.from_bytes(fields[i], "big") for i in (1, 2, 3))
    return nonce, Fees(max_fee_per_gas=max_fee, max_priority_fee_per_gas=tip)


def sign_eip1559(
    key: EvmKey,
    *,
    chain_id: int,
    nonce: int,
    to: str,
    value: int,
    data: bytes,
    gas: int,
    fees: Fees,
) -> bytes:
    """The signed type-2 transaction bytes (EIP-1559: 0x02 || rlp(fields + y, r, s)).

    Signed with libsecp256k1 directly: eth_account would cost seconds of import time in
    every worker process."""
    fields: list[object] = [
        chain_id,
        nonce,
        fees.max_priority_fee_per_gas,
        fees.max_fee_per_gas,
        gas,
        bytes.fromhex(to_checksum_address(to)[2:]),
        value,
        data,
        [],
    ]
    digest = keccak(b"\x02" + rlp.encode(fields))
    signature = PrivateKey(key.private_key.reveal()).sign_recoverable(digest, hasher=None)
    r, s, y_parity = signature[:32], signature[32:64], signature[64]
    signed = [*fields, y_parity, int.from_bytes(r, "big"), int.from_bytes(s, "big")]
    return b"\x02" + bytes(rlp.encode(signed))


def allocate_nonce(session: Session, source: EvmSource, *, chain: str, address: str) -> int:
    """Take the next nonce of (chain, address) in the caller's transaction (row-locked
    until commit, so concurrent signers of one address queue here)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    row = session.execute(
        select(SenderNonce.next_nonce)
        .where(SenderNonce.chain == chain, SenderNonce.address == address)
        .with_for_update()
    ).scalar_one_or_none()
    if row is None:
        start = source.nonce(address, pending=True)
        session.execute(
            insert(SenderNonce)
            .values(chain=chain, address=address, next_nonce=start)
            .on_conflict_do_nothing(index_elements=["chain", "address"])
        )
        row = session.execute(
            select(SenderNonce.next_nonce)
            .where(SenderNonce.chain == chain, SenderNonce.address == address)
            .with_for_update()
        ).scalar_one()
    session.execute(
        update(SenderNonce)
        .where(SenderNonce.chain == chain, SenderNonce.address == address)
        .values(next_nonce=row + 1)
    )
    return int(row)


class EvmSender:
    """Signs with one key (from the keystore) and reads/broadcasts through `source`."""

    def __init__(
        self,
        source: EvmSource,
        key: EvmKey,
        *,
        chain: str,
        chain_id: int,
        max_fee_gwei: int,
        confirmations: int,
    ) -> None:
        assert confirmations >= 0 and max_fee_gwei > 0
        self.source = source
        self.key = key
        self.chain = chain
        self.chain_id = chain_id
        self.cap_wei = max_fee_gwei * GWEI
        self.confirmations = confirmations
        self._quote: Fees | None = None
        self._quoted_at = 0.0

    @property
    def address(self) -> str:
        return self.key.address

    def _fees(self) -> Fees:
        """The fee quote, reused for FEE_QUOTE_TTL_S: 2 x base fee leaves room for
        several blocks of base-fee growth, and a burst of payouts needs one quote."""
        now = time.monotonic()
        if self._quote is None or now - self._quoted_at > FEE_QUOTE_TTL_S:
            self._quote = quote_fees(self.source, self.cap_wei)
            self._quoted_at = now
        return self._quote

    def gas_cost_cap_wei(self, gas: int = ERC20_TRANSFER_GAS) -> int:
        """The most a transaction with `gas` signed now may cost: what a node wants the
        sender to hold before it accepts the transaction."""
        return gas * self._fees().max_fee_per_gas

    def _sign(
        self, *, nonce: int, to: str, data: bytes, value: int, gas: int, fees: Fees
    ) -> SignedTx:
        raw = sign_eip1559(
            self.key,
            chain_id=self.chain_id,
            nonce=nonce,
            to=to,
            value=value,
            data=data,
            gas=gas,
            fees=fees,
        )
        return SignedTx(
            tx_hash="0x" + keccak(raw).hex(),
            raw_tx=raw,
            nonce=nonce,
            max_fee_per_gas=fees.max_fee_per_gas,
            max_priority_fee_per_gas=fees.max_priority_fee_per_gas,
        )

    def sign_token_transfer(
        self, session: Session, *, token: str, to: str, amount_base_units: int
    ) -> SignedTx:
        """Allocate the next nonce (in `session`'s transaction) and sign the transfer."""
        fees = self._fees()
        nonce = allocate_nonce(session, self.source, chain=self.chain, address=self.address)
        return self._sign(
            nonce=nonce,
            to=token,
            data=erc20_transfer_data(to, amount_base_units),
            value=0,
            gas=ERC20_TRANSFER_GAS,
            fees=fees,
        )

    def sign_native_transfer(self, session: Session, *, to: str, amount_wei: int) -> SignedTx:
        fees = self._fees()
        nonce = allocate_nonce(session, self.source, chain=self.chain, address=self.address)
        return self._sign(
            nonce=nonce, to=to, data=b"", value=amount_wei, gas=NATIVE_TRANSFER_GAS, fees=fees
        )

    def sign_replacement(
        self, raw_tx: bytes, *, token: str, to: str, amount_base_units: int
    ) -> SignedTx | None:
        """The same transfer with the same nonce and higher fees, or None when the cap
        leaves no room for a valid replacement."""
        nonce, old = decode_fees(raw_tx)
        try:
            current = quote_fees(self.source, self.cap_wei)
        except FeeCapExceeded:
            return None
        fees = bumped_fees(old, current, self.cap_wei)
        if fees is None:
            return None
        return self._sign(
            nonce=nonce,
            to=token,
            data=erc20_transfer_data(to, amount_base_units),
            value=0,
            gas=ERC20_TRANSFER_GAS,
            fees=fees,
        )

    def broadcast(self, raw_tx: bytes) -> str:
        return self.source.send_raw_transaction(raw_tx)

    def outcome(self, tx_hashes: Sequence[str]) -> TxOutcome:
        """Which stored transaction (if any) was mined, and whether it is deep enough."""
        for tx_hash in tx_hashes:
            receipt = self.source.receipt(tx_hash)
            if receipt is None:
                continue
            depth = self.source.head() - receipt.block_number + 1
            if depth < max(1, self.confirmations):
                return TxOutcome(
                    TxState.PENDING, tx_hash=tx_hash, block_number=receipt.block_number
                )
            if receipt.succeeded:
                return TxOutcome(
                    TxState.CONFIRMED, tx_hash=tx_hash, block_number=receipt.block_number
                )
            return TxOutcome(
                TxState.FAILED,
                tx_hash=tx_hash,
                block_number=receipt.block_number,
                error="transaction reverted (receipt status 0)",
            )
        return TxOutcome(TxState.PENDING)


def landing_verdict(
    source: EvmSource,
    *,
    signer: str,
    nonce: int,
    tx_hashes: Sequence[str],
    confirmations: int,
    wait_s: float,
    poll_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> LandingVerdict:
    """Whether one of `tx_hashes` (all signed by `signer` with `nonce`) can still be mined.

    They share the nonce, so none can once the chain has used it for a transaction that is
    none of them, at the confirmation depth: the nonce is read at `latest`, then again
    (with the receipts) once `confirmations` more blocks are mined, waiting up to `wait_s`.
    """
    assert tx_hashes and wait_s >= 0

    def mined() -> LandingVerdict | None:
        for tx_hash in tx_hashes:
            receipt = source.receipt(tx_hash)
            if receipt is not None:
                return LandingVerdict(
                    True,
                    f"transaction {tx_hash} was mined in block {receipt.block_number}: "
                    "`escrowd payouts retry` lets the worker settle the payout",
                )
        return None

    found = mined()
    if found is not None:
        return found
    seen_at = source.head()
    expected = source.nonce(signer, pending=False)
    if expected <= nonce:
        return LandingVerdict(
            True,
            f"nonce {nonce} of {signer} is unused (the chain expects nonce {expected} next): "
            "a stored transaction may still be mined",
        )
    deep_at = seen_at + max(1, confirmations)
    deadline = time.monotonic() + wait_s
    while source.head() < deep_at:
        if time.monotonic() >= deadline:
            return LandingVerdict(
                True,
                f"nonce {nonce} of {signer} was used by another transaction by block "
                f"{seen_at}; block {deep_at} (the confirmation depth) was not mined within "
                f"{wait_s:g} s: run the command again later",
            )
        sleep(poll_s)
    found = mined()
    if found is not None:
        return found
    if source.nonce(signer, pending=False) <= nonce:
        return LandingVerdict(
            True, f"nonce {nonce} of {signer} is unused again (a reorg): it may still be mined"
        )
    return LandingVerdict(
        False,
        f"nonce {nonce} of {signer} was used by a transaction escrowd did not sign "
        f"(by block {seen_at}, still at block {deep_at} or later) and none of the "
        f"{len(tx_hashes)} stored transactions was mined: none can be any more",
    )
