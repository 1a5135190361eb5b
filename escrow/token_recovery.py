"""Recovering a token escrowd does not credit from a deposit address: `escrowd tokens
recover`, run by an operator.

Exactly once, by the payout rules. The recovery row is written first, and at most one is
open per (chain, token, address) (a partial unique index decides two commands racing).
The transfer is then signed with the deposit address's key, its nonce taken from
``sender_nonces`` in the same transaction, and stored before it is sent. If the address
lacks the gas for exactly that stored transaction, the gas wallet sends it the difference
(that funding transaction is itself stored before it is sent, and a new one is signed only
once the previous one is mined). Running the command again resumes the open recovery: it
sends the stored bytes again and never signs a second transfer.

States: requested -> signed -> confirmed | failed (the transfer reverted). Every step is
an audit row in the stream ``token-recovery:<chain>:<id>``, with the operator named. No
ledger entry: the token was never credited. Unsupported deposits of that token at that
address recorded before the confirming block are linked to the recovery.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from eth_utils.crypto import keccak
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import Conflict, NotFound, ValidationFailed
from escrowd.config.settings import EvmChainSettings
from escrowd.escrow import audit
from escrowd.escrow.uow import in_transaction
from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_sender import (
    GWEI,
    NATIVE_TRANSFER_GAS,
    allocate_nonce,
    decode_fees,
    erc20_transfer_data,
    quote_fees,
    sign_eip1559,
)
from escrowd.indexer.evm_source import EvmSource
from escrowd.models import (
    Chain,
    DepositAddress,
    RecoveryStatus,
    TokenRecovery,
    UnsupportedDeposit,
)
from escrowd.wallets.keystore import EvmKey

log = structlog.get_logger(__name__)

OPEN = (RecoveryStatus.REQUESTED.value, RecoveryStatus.SIGNED.value)
# Gas limit = the node's estimate * 3/2: a token's transfer may cost more once the
# recipient's balance slot is new, and an unknown token may be costlier than USDC.
GAS_MARGIN_NUM, GAS_MARGIN_DEN = 3, 2


class RecoveryRefused(ValidationFailed):
    """The recovery cannot be asked for as given (not a deposit address, USDC, nothing
    there, more than there is, a token that refuses the transfer)."""

    type = "recovery_refused"


class NothingToRecover(NotFound):
    """The address holds none of the token (any more)."""

    type = "nothing_to_recover"


class RecoveryInFlight(Conflict):
    """Another recovery of this token from this address is open with other terms."""

    type = "recovery_in_flight"


@dataclass(frozen=True)
class RecoveryRequest:
    """Addresses EIP-55 checksummed; ``amount_base_units`` None: the whole balance."""

    chain: str
    token: str
    address: str
    destination: str
    amount_base_units: int | None
    operator: str


@dataclass(frozen=True)
class RecoveryProgress:
    recovery_id: int
    status: str
    # What this pass did: signed, gas_sent, gas_waiting, sent, mined, confirmed, failed.
    step: str
    amount_base_units: int
    tx_hash: str | None = None
    block_number: int | None = None

    @property
    def finished(self) -> bool:
        return self.status in (RecoveryStatus.CONFIRMED, RecoveryStatus.FAILED)


def _stream(recovery: TokenRecovery) -> str:
    return f"token-recovery:{recovery.chain}:{recovery.id}"


class TokenRecoverer:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        chain: EvmChainSettings,
        source: EvmSource,
        *,
        gas_wallet: EvmKey,
        deposit_key: Callable[[int], EvmKey],
    ) -> None:
        self.sessions = sessions
        self.chain = chain
        self.source = source
        self.gas_wallet = gas_wallet
        self.deposit_key = deposit_key
        self.cap_wei = chain.max_fee_gwei * GWEI

    # asking ---------------------------------------------------------------------------

    def start(self, request: RecoveryRequest) -> int:
        """The id of the open recovery for these terms, created when there is none."""
        if request.token.lower() == self.chain.usdc_address.lower():
            raise RecoveryRefused(
                f"{request.token} is the USDC of {self.chain.name}: it is credited to the "
                "agent and swept by the sweep job, not recovered"
            )
        if request.amount_base_units is not None and request.amount_base_units <= 0:
            raise RecoveryRefused("the amount must be a positive number of base units")
        self._derivation_index(request.address)
        existing = self._open(request)
        if existing is not None:
            return existing
        balance = self.source.erc20_balance(request.token, request.address)
        amount = balance if request.amount_base_units is None else request.amount_base_units
        if balance <= 0:
            raise NothingToRecover(f"{request.address} holds none of token {request.token}")
        if amount > balance:
            raise RecoveryRefused(
                f"{request.address} holds {balance} base units of {request.token}, "
                f"fewer than the {amount} asked for"
            )
        data = erc20_transfer_data(request.destination, amount)
        try:
            estimate = self.source.estimate_gas(
                {"from": request.address, "to": request.token, "data": "0x" + data.hex()}
            )
        except RpcError as exc:
            raise RecoveryRefused(
                f"token {request.token} refuses the transfer from {request.address}: {exc}"
            ) from None
        gas_limit = -(-estimate * GAS_MARGIN_NUM // GAS_MARGIN_DEN)
        try:
            return in_transaction(
                self.sessions, lambda session: self._create(session, request, amount, gas_limit)
            )
        except IntegrityError:
            # Another command created it between our look and our insert.
            existing = self._open(request)
            if existing is None:
                raise
            return existing

    def _derivation_index(self, address: str) -> int:
        with self.sessions() as session:
            index = session.scalar(
                select(DepositAddress.derivation_index).where(
                    DepositAddress.chain == Chain.EVM.value,
                    func.lower(DepositAddress.address) == address.lower(),
                )
            )
        if index is None:
            raise RecoveryRefused(
                f"{address} is not a deposit address of this escrowd; only tokens at deposit "
                "addresses (whose keys escrowd derives) can be recovered"
            )
        return int(index)

    def _open(self, request: RecoveryRequest) -> int | None:
        with self.sessions() as session:
            recovery = session.scalars(
                select(TokenRecovery).where(
                    TokenRecovery.chain == self.chain.name,
                    TokenRecovery.token_address == request.token,
                    TokenRecovery.source_address == request.address,
                    TokenRecovery.status.in_(OPEN),
                )
            ).one_or_none()
        if recovery is None:
            return None
        same_amount = request.amount_base_units in (None, int(recovery.amount_base_units))
        if recovery.destination != request.destination or not same_amount:
            raise RecoveryInFlight(
                f"recovery {recovery.id} of {recovery.amount_base_units} base units of "
                f"{recovery.token_address} from {recovery.source_address} to "
                f"{recovery.destination} is in flight ({recovery.status}); run the command "
                "with its terms to follow it to the end"
            )
        return recovery.id

    def _create(
        self, session: Session, request: RecoveryRequest, amount: int, gas_limit: int
    ) -> int:
        recovery = TokenRecovery(
            chain=self.chain.name,
            token_address=request.token,
            source_address=request.address,
            destination=request.destination,
            amount_base_units=str(amount),
            status=RecoveryStatus.REQUESTED.value,
            requested_by=request.operator,
            gas_limit=gas_limit,
        )
        session.add(recovery)
        session.flush()
        self._audit(session, recovery, "token_recovery_requested", gas_limit=gas_limit)
        log.info(
            "token_recovery_requested",
            recovery_id=recovery.id,
            chain=recovery.chain,
            token_address=recovery.token_address,
            source=recovery.source_address,
            destination=recovery.destination,
            amount_base_units=recovery.amount_base_units,
            operator=request.operator,
        )
        return recovery.id

    def _audit(
        self, session: Session, recovery: TokenRecovery, action: str, **extra: object
    ) -> None:
        audit.append(
            session,
            stream=_stream(recovery),
            actor=f"operator:{recovery.requested_by}",
            action=action,
            details={
                "chain": recovery.chain,
                "token_address": recovery.token_address,
                "source": recovery.source_address,
                "destination": recovery.destination,
                "amount_base_units": recovery.amount_base_units,
                "tx_hash": recovery.tx_hash,
                **extra,
            },
        )

    # driving --------------------------------------------------------------------------

    def run(
        self, request: RecoveryRequest, *, wait_s: float, pause_s: float = 1.0
    ) -> RecoveryProgress:
        """Start (or resume) and drive the recovery until it is settled or ``wait_s``
        has passed; the last pass's progress."""
        recovery_id = self.start(request)
        deadline = time.monotonic() + wait_s
        while True:
            progress = self.advance(recovery_id)
            if progress.finished or time.monotonic() >= deadline:
                return progress
            if progress.step != "signed":
                time.sleep(pause_s)

    def advance(self, recovery_id: int) -> RecoveryProgress:
        """One step: sign, fund gas, send (again), or settle once deep enough."""
        recovery = self._load(recovery_id)
        if recovery.status == RecoveryStatus.REQUESTED:
            key = self.deposit_key(self._derivation_index(recovery.source_address))
            assert key.address.lower() == recovery.source_address.lower(), "deposit key mismatch"
            recovery = in_transaction(self.sessions, lambda s: self._sign(s, recovery_id, key))
            return self._progress(recovery, "signed")
        if recovery.status != RecoveryStatus.SIGNED:
            return self._progress(recovery, recovery.status)
        tx_hash, raw_tx = recovery.tx_hash, recovery.raw_tx
        assert tx_hash is not None and raw_tx is not None, "a signed recovery stores its bytes"
        receipt = self.source.receipt(tx_hash)
        if receipt is not None:
            depth = self.source.head() - receipt.block_number + 1
            if depth < max(1, self.chain.confirmations):
                return self._progress(recovery, "mined", receipt.block_number)
            status = RecoveryStatus.CONFIRMED if receipt.succeeded else RecoveryStatus.FAILED
            recovery = in_transaction(
                self.sessions,
                lambda s: self._finish(s, recovery_id, status, receipt.block_number),
            )
            return self._progress(recovery, status.value, receipt.block_number)
        _, fees = decode_fees(raw_tx)
        need = recovery.gas_limit * fees.max_fee_per_gas
        have = self.source.native_balance_wei(recovery.source_address)
        if have < need:
            pending_gas = recovery.gas_tx_hash is not None and recovery.gas_raw_tx is not None
            if pending_gas and self.source.receipt(str(recovery.gas_tx_hash)) is None:
                self._send(bytes(recovery.gas_raw_tx or b""))
                return self._progress(recovery, "gas_waiting")
            recovery = in_transaction(
                self.sessions, lambda s: self._fund_gas(s, recovery_id, need - have)
            )
            self._send(bytes(recovery.gas_raw_tx or b""))
            return self._progress(recovery, "gas_sent")
        self._send(raw_tx)
        return self._progress(recovery, "sent")

    def _load(self, recovery_id: int) -> TokenRecovery:
        with self.sessions() as session:
            recovery = session.get(TokenRecovery, recovery_id)
        assert recovery is not None, f"recovery {recovery_id} vanished"
        return recovery

    def _progress(
        self, recovery: TokenRecovery, step: str, block_number: int | None = None
    ) -> RecoveryProgress:
        return RecoveryProgress(
            recovery.id,
            recovery.status,
            step,
            int(recovery.amount_base_units),
            recovery.tx_hash,
            block_number if block_number is not None else recovery.block_number,
        )

    def _send(self, raw_tx: bytes) -> None:
        try:
            self.source.send_raw_transaction(raw_tx)
        except RpcError as exc:
            # The bytes stay stored; the next pass (or the next run) sends them again.
            log.warning("token_recovery_send_failed", error=str(exc))

    def _locked(self, session: Session, recovery_id: int) -> TokenRecovery:
        recovery = session.get(TokenRecovery, recovery_id, with_for_update=True)
        assert recovery is not None
        return recovery

    def _sign(self, session: Session, recovery_id: int, key: EvmKey) -> TokenRecovery:
        recovery = self._locked(session, recovery_id)
        if recovery.status != RecoveryStatus.REQUESTED:
            return recovery  # another run signed it first
        fees = quote_fees(self.source, self.cap_wei)
        nonce = allocate_nonce(
            session, self.source, chain=self.chain.name, address=recovery.source_address
        )
        raw = sign_eip1559(
            key,
            chain_id=self.chain.chain_id,
            nonce=nonce,
            to=recovery.token_address,
            value=0,
            data=erc20_transfer_data(recovery.destination, int(recovery.amount_base_units)),
            gas=recovery.gas_limit,
            fees=fees,
        )
        recovery.raw_tx = raw
        recovery.tx_hash = "0x" + keccak(raw).hex()
        recovery.nonce = nonce
        recovery.status = RecoveryStatus.SIGNED.value
        session.flush()
        self._audit(session, recovery, "token_recovery_signed", nonce=nonce)
        return recovery

    def _fund_gas(self, session: Session, recovery_id: int, amount_wei: int) -> TokenRecovery:
        recovery = self._locked(session, recovery_id)
        fees = quote_fees(self.source, self.cap_wei)
        nonce = allocate_nonce(
            session, self.source, chain=self.chain.name, address=self.gas_wallet.address
        )
        raw = sign_eip1559(
            self.gas_wallet,
            chain_id=self.chain.chain_id,
            nonce=nonce,
            to=recovery.source_address,
            value=amount_wei,
            data=b"",
            gas=NATIVE_TRANSFER_GAS,
            fees=fees,
        )
        recovery.gas_raw_tx = raw
        recovery.gas_tx_hash = "0x" + keccak(raw).hex()
        session.flush()
        self._audit(
            session,
            recovery,
            "token_recovery_gas_signed",
            gas_tx_hash=recovery.gas_tx_hash,
            amount_wei=str(amount_wei),
        )
        return recovery

    def _finish(
        self, session: Session, recovery_id: int, status: RecoveryStatus, block_number: int
    ) -> TokenRecovery:
        recovery = self._locked(session, recovery_id)
        if recovery.status != RecoveryStatus.SIGNED:
            return recovery
        recovery.status = status.value
        recovery.block_number = block_number
        if status is RecoveryStatus.FAILED:
            recovery.error = "the transfer reverted on chain (receipt status 0)"
        else:
            session.execute(
                update(UnsupportedDeposit)
                .where(
                    UnsupportedDeposit.chain == recovery.chain,
                    UnsupportedDeposit.token_address == recovery.token_address,
                    UnsupportedDeposit.to_address == recovery.source_address,
                    UnsupportedDeposit.recovery_id.is_(None),
                    UnsupportedDeposit.block_number <= block_number,
                )
                .values(recovery_id=recovery.id)
            )
        session.flush()
        self._audit(session, recovery, f"token_recovery_{status.value}", block_number=block_number)
        log.info(
            "token_recovery_finished",
            recovery_id=recovery.id,
            status=recovery.status,
            tx_hash=recovery.tx_hash,
            block_number=block_number,
        )
        return recovery
