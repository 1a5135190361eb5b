"""A local Solana ledger: LiteSVM executes, this module keeps the history a node would.

LiteSVM runs transactions instantly and remembers nothing about slots or blocks, so the
ledger assigns each accepted transaction to the current tip block and records what a
node's ``getTransaction`` would show (pre/post lamport and token balances, ``err``,
fee, logs, inner instructions), plus per-address signature lists for every account key a
transaction lists. Slots advance explicitly (``advance_slots``) or on a clock driven by
the RPC server. Commitments are slot lags behind the tip; some slots are skipped
deterministically.

Like a real node it can start at any slot (``first_slot``, e.g. mainnet's ~4x10^8), forget
history below a slot (``prune_history``: its first available block moves up), answer as a
replica some slots behind (``commitment_slot(..., behind_slots=N)``, ``account_at``), and
drop blocks that are not finalized yet (``drop_blocks``: a fork switch; their transactions
vanish and the accounts they wrote are restored, so the same signed transaction may land
again in a later block).
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from solders.account import Account
from solders.hash import Hash
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import Message, MessageV0, MessageV1
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import (
    CreateAccountParams,
    TransferParams,
    create_account,
    transfer,
)
from solders.token.state import Mint, TokenAccount
from solders.transaction import VersionedTransaction
from solders.transaction_metadata import (
    FailedTransactionMetadata,
    InnerInstruction,
    TransactionMetadata,
)
from spl.token.constants import ASSOCIATED_TOKEN_PROGRAM_ID, TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
    initialize_mint2,
    mint_to_checked,
    transfer_checked,
)
from spl.token.models import InitializeMint2Params, MintToCheckedParams, TransferCheckedParams

log = structlog.get_logger(__name__)

SYSTEM_PROGRAM_ID = Pubkey.from_string("11111111111111111111111111111111")
MINT_SIZE = 82
TOKEN_ACCOUNT_SIZE = 165
COMMITMENTS = ("processed", "confirmed", "finalized")
# What the faucet starts with; far more than any test spends, well below u64::MAX.
FAUCET_LAMPORTS = 10**18
# A node keeps recent statuses for about MAX_RECENT_BLOCKHASHES blocks; older ones need
# searchTransactionHistory.
STATUS_CACHE_SLOTS = 300
# An address lookup table account: a 56-byte header, then 32-byte addresses.
LOOKUP_TABLE_META_SIZE = 56
# An SPL token account's amount: a little-endian u64 after the mint and owner keys.
TOKEN_AMOUNT_OFFSET = 64


@dataclass(frozen=True)
class TokenBalance:
    """One entry of a node's preTokenBalances / postTokenBalances."""

    account_index: int
    mint: Pubkey
    owner: Pubkey
    amount_base_units: int
    decimals: int


@dataclass(frozen=True)
class InnerIx:
    """One instruction a program invoked (CPI) while executing a top-level instruction."""

    program_id_index: int
    accounts: bytes
    data: bytes
    stack_height: int | None


@dataclass(frozen=True)
class RecordedTx:
    """A transaction that landed in a block, with the meta a node would store."""

    signature: Signature
    tx: VersionedTransaction
    slot: int
    err: Any  # the node's JSON form of TransactionError, None on success
    fee_lamports: int
    pre_balances: list[int]
    post_balances: list[int]
    pre_token_balances: list[TokenBalance]
    post_token_balances: list[TokenBalance]
    logs: list[str]
    compute_units: int
    loaded_writable: tuple[Pubkey, ...] = ()
    loaded_readonly: tuple[Pubkey, ...] = ()
    # (top-level instruction index, the instructions it invoked), as a node's
    # meta.innerInstructions lists them: only instructions that invoked something.
    inner_instructions: tuple[tuple[int, tuple[InnerIx, ...]], ...] = ()

    @property
    def account_keys(self) -> list[Pubkey]:
        """Static keys, then addresses loaded from lookup tables (the node's order)."""
        return [
            *self.tx.message.account_keys,
            *self.loaded_writable,
            *self.loaded_readonly,
        ]


@dataclass
class Block:
    slot: int
    parent_slot: int
    blockhash: Hash
    previous_blockhash: Hash
    block_height: int
    block_time: int
    txs: list[RecordedTx] = field(default_factory=list)


class SendRejected(Exception):
    """The transaction was not accepted; ``code``/``message``/``data`` are the node's."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def tx_error_message(err: Any) -> str:
    """The node's Display text for a TransactionError (JSON form), for -32002 messages."""
    fixed = {
        "BlockhashNotFound": "Blockhash not found",
        "AlreadyProcessed": "This transaction has already been processed",
        "AccountNotFound": "Attempt to debit an account but found no record of a prior credit.",
        "InsufficientFundsForFee": "Insufficient funds for fee",
        "SignatureFailure": "Transaction did not pass signature verification",
        "AccountInUse": "Account in use",
    }
    if isinstance(err, str):
        return fixed.get(err, err)
    if isinstance(err, dict) and "InstructionError" in err:
        index, inner = err["InstructionError"]
        if isinstance(inner, dict) and "Custom" in inner:
            detail = f"custom program error: {inner['Custom']:#x}"
        else:
            detail = str(inner)
        return f"Error processing Instruction {index}: {detail}"
    if isinstance(err, dict) and "InsufficientFundsForRent" in err:
        index = err["InsufficientFundsForRent"]["account_index"]
        return f"Transaction results in an account ({index}) with insufficient funds for rent"
    return json.dumps(err)


def is_writable(message: Message | MessageV0 | MessageV1, index: int) -> bool:
    header = message.header
    n_keys = len(message.account_keys)
    signed = header.num_required_signatures
    if index < signed:
        return index < signed - header.num_readonly_signed_accounts
    return index < n_keys - header.num_readonly_unsigned_accounts


class SolanaChain:
    """LiteSVM plus block history. Thread-safe: every public method takes the lock."""

    def __init__(
        self,
        *,
        confirmed_lag_slots: int = 1,
        finalized_lag_slots: int = 32,
        skip_every_slots: int | None = 7,
        blockhash_valid_blocks: int = 150,
        first_slot: int = 0,
    ) -> None:
        assert 0 <= confirmed_lag_slots <= finalized_lag_slots
        assert skip_every_slots is None or skip_every_slots >= 2
        assert first_slot >= 0
        self.confirmed_lag_slots = confirmed_lag_slots
        self.finalized_lag_slots = finalized_lag_slots
        self.skip_every_slots = skip_every_slots
        self.blockhash_valid_blocks = blockhash_valid_blocks
        self.first_slot = first_slot
        self._lock = threading.RLock()
        # Our own blockhash window replaces LiteSVM's check, which accepts only the
        # single latest blockhash; each new block still calls expire_blockhash(). Our own
        # duplicate check replaces LiteSVM's history, so a transaction of a dropped block
        # can land again.
        self.svm = LiteSVM().with_blockhash_check(False).with_transaction_history(0)
        self.faucet = Keypair()
        self.svm.set_account(
            self.faucet.pubkey(),
            Account(lamports=FAUCET_LAMPORTS, data=b"", owner=SYSTEM_PROGRAM_ID),
        )
        self.mint_authority = Keypair()
        self.usdc_mint: Pubkey | None = None
        self._slot = first_slot
        genesis_hash = self.svm.latest_blockhash()
        genesis = Block(first_slot, first_slot, genesis_hash, Hash.default(), 0, int(time.time()))
        self._blocks: dict[int, Block] = {first_slot: genesis}
        self._produced: list[int] = [first_slot]
        self._first_available = first_slot
        self._blockhash_height: dict[Hash, int] = {genesis_hash: 0}
        self._by_signature: dict[Signature, RecordedTx] = {}
        self._by_address: dict[Pubkey, list[RecordedTx]] = {}
        # Per unfinalized block: each transaction's written accounts as they were before
        # it ran, so drop_blocks can restore them.
        self._undo: dict[int, list[list[tuple[Pubkey, Account | None]]]] = {}
        self._fillers: list[Keypair] = []
        self.svm.warp_to_slot(first_slot)
        # Transactions land in the tip block; genesis itself stays empty and finalized.
        self.advance_slots(1)

    # ---- slots and commitments -------------------------------------------------

    def is_skipped(self, slot: int) -> bool:
        every = self.skip_every_slots
        return every is not None and slot > self.first_slot and slot % every == 0

    def advance_slots(self, n_slots: int = 1) -> int:
        """Let ``n_slots`` slots pass (skipped ones produce no block); returns the tip slot."""
        assert n_slots >= 0
        with self._lock:
            for _ in range(n_slots):
                self._slot += 1
                if self.is_skipped(self._slot):
                    continue
                self._produce_block()
            finalized = self.commitment_slot("finalized")
            for slot in [s for s in self._undo if s <= finalized]:
                del self._undo[slot]
            return self._produced[-1]

    def _produce_block(self) -> None:
        parent = self._blocks[self._produced[-1]]
        self.svm.expire_blockhash()
        self.svm.warp_to_slot(self._slot)
        blockhash = self.svm.latest_blockhash()
        block = Block(
            slot=self._slot,
            parent_slot=parent.slot,
            blockhash=blockhash,
            previous_blockhash=parent.blockhash,
            block_height=parent.block_height + 1,
            block_time=int(time.time()),
        )
        self._blocks[self._slot] = block
        self._produced.append(self._slot)
        self._blockhash_height[blockhash] = block.block_height
        self._undo[self._slot] = []

    def finalize_all(self) -> int:
        """Advance until everything sent so far is finalized; returns the finalized slot."""
        with self._lock:
            target = self._produced[-1]
            while self.commitment_slot("finalized") < target:
                self.advance_slots(1)
            return self.commitment_slot("finalized")

    def commitment_slot(self, commitment: str, behind_slots: int = 0) -> int:
        """The highest block slot visible at ``commitment``; ``behind_slots`` answers as a
        replica that has seen the chain only up to that many slots before the tip."""
        assert commitment in COMMITMENTS and behind_slots >= 0
        with self._lock:
            tip = self._produced[-1]
            lag = {
                "processed": 0,
                "confirmed": self.confirmed_lag_slots,
                "finalized": self.finalized_lag_slots,
            }[commitment]
            limit = max(self.first_slot, tip - behind_slots - lag)
            return self._produced[bisect.bisect_right(self._produced, limit) - 1]

    def block(self, slot: int) -> Block | None:
        with self._lock:
            return self._blocks.get(slot)

    def tip_block(self) -> Block:
        with self._lock:
            return self._blocks[self._produced[-1]]

    def block_at(self, commitment: str, behind_slots: int = 0) -> Block:
        with self._lock:
            return self._blocks[self.commitment_slot(commitment, behind_slots)]

    def produced_slots(self, start: int, end: int) -> list[int]:
        with self._lock:
            lo = bisect.bisect_left(self._produced, start)
            hi = bisect.bisect_right(self._produced, end)
            return self._produced[lo:hi]

    def current_slot(self) -> int:
        """The last slot that passed, skipped or not (what the clock counts)."""
        with self._lock:
            return self._slot

    # ---- pruned history --------------------------------------------------------------

    @property
    def first_available_block(self) -> int:
        """The lowest slot whose block this node still has (getFirstAvailableBlock)."""
        with self._lock:
            return self._first_available

    def prune_history(self, below_slot: int) -> int:
        """Forget blocks and transactions below ``below_slot`` (a node's ledger cleanup);
        it must not pass the finalized slot. Returns the first available block."""
        with self._lock:
            assert below_slot <= self.commitment_slot("finalized"), "prune finalized slots only"
            first = self.produced_slots(below_slot, self._produced[-1])[0]
            self._first_available = max(self._first_available, first)
            return self._first_available

    def is_pruned(self, slot: int) -> bool:
        return slot < self._first_available

    # ---- forks -------------------------------------------------------------------------

    def drop_blocks(self, from_slot: int) -> list[Signature]:
        """A fork switch: the blocks from ``from_slot`` on (none of them finalized) leave
        the chain, their slots count as skipped, the accounts their transactions wrote
        are restored, and a new block is produced on the remaining tip. Returns the
        signatures that vanished (each may be sent again)."""
        with self._lock:
            assert from_slot > self.commitment_slot("finalized"), "finalized blocks never drop"
            dropped = [slot for slot in self._produced if slot >= from_slot]
            gone: list[Signature] = []
            for slot in reversed(dropped):
                block = self._blocks.pop(slot)
                undone = list(zip(block.txs, self._undo.pop(slot), strict=True))
                for record, undo in reversed(undone):
                    for address, account in undo:
                        empty = Account(lamports=0, data=b"", owner=SYSTEM_PROGRAM_ID)
                        self.svm.set_account(address, account or empty)
                    del self._by_signature[record.signature]
                    for key in dict.fromkeys(record.account_keys):
                        history = self._by_address[key]
                        assert history[-1] is record
                        history.pop()
                    gone.append(record.signature)
                del self._blockhash_height[block.blockhash]
                self._produced.pop()
            self._slot += 1
            self._produce_block()
            gone.reverse()
            log.debug("solana_sim_fork", dropped_slots=dropped, transactions=len(gone))
            return gone

        # ---- blockhashes -------------------------------------------------------------

    def blockhash_valid(self, blockhash: Hash) -> bool:
        with self._lock:
            height = self._blockhash_height.get(blockhash)
            tip_height = self.tip_block().block_height
            return height is not None and tip_height - height <= self.blockhash_valid_blocks

    # ---- history -------------------------------------------------------------------

    def transaction(self, signature: Signature) -> RecordedTx | None:
        with self._lock:
            return self._by_signature.get(signature)

    def signatures_for(self, address: Pubkey) -> list[RecordedTx]:
        """Every recorded transaction listing ``address``, oldest first."""
        with self._lock:
            return list(self._by_address.get(address, []))

    def balance_at(self, address: Pubkey, slot: int) -> int:
        """Lamports of ``address`` at the end of block ``slot``: undo later changes."""
        with self._lock:
            lamports = self.svm.get_balance(address) or 0
            for rec in reversed(self._by_address.get(address, [])):
                if rec.slot <= slot:
                    break
                for index, key in enumerate(rec.account_keys):
                    if key == address:
                        lamports -= rec.post_balances[index] - rec.pre_balances[index]
                        break
            return lamports

    def account_at(self, address: Pubkey, slot: int) -> Account | None:
        """The account as of the end of block ``slot`` (what a replica at that slot
        serves): later transactions' lamport and token amount changes undone; None when
        it held no lamports then."""
        with self._lock:
            current = self.svm.get_account(address)
            lamports = current.lamports if current is not None else 0
            amount_change = 0
            for rec in reversed(self._by_address.get(address, [])):
                if rec.slot <= slot:
                    break
                index = rec.account_keys.index(address)
                lamports -= rec.post_balances[index] - rec.pre_balances[index]
                amount_change += _token_amount(rec.post_token_balances, index) - _token_amount(
                    rec.pre_token_balances, index
                )
            if lamports == 0:
                return None
            if current is None:
                # Closed since: only its lamports are known.
                return Account(lamports=lamports, data=b"", owner=SYSTEM_PROGRAM_ID)
            data = bytes(current.data)
            if amount_change:
                start = TOKEN_AMOUNT_OFFSET
                amount = int.from_bytes(data[start : start + 8], "little") - amount_change
                data = data[:start] + amount.to_bytes(8, "little") + data[start + 8 :]
            return Account(
                lamports=lamports,
                data=data,
                owner=current.owner,
                executable=current.executable,
                rent_epoch=current.rent_epoch,
            )

    # ---- accounts --------------------------------------------------------------------

    def account(self, address: Pubkey) -> Account | None:
        with self._lock:
            acc = self.svm.get_account(address)
            if acc is None or (acc.lamports == 0 and not acc.data):
                return None
            return acc

    def rent_exempt_minimum(self, data_len: int) -> int:
        with self._lock:
            return int(self.svm.minimum_balance_for_rent_exemption(data_len))

    def mint_decimals(self, mint: Pubkey) -> int | None:
        acc = self.account(mint)
        if acc is None or acc.owner != TOKEN_PROGRAM_ID or len(acc.data) != MINT_SIZE:
            return None
        return Mint.from_bytes(bytes(acc.data)).decimals

    def token_account(self, address: Pubkey) -> TokenAccount | None:
        acc = self.account(address)
        if acc is None or acc.owner != TOKEN_PROGRAM_ID or len(acc.data) != TOKEN_ACCOUNT_SIZE:
            return None
        return TokenAccount.from_bytes(bytes(acc.data))

    def token_accounts_of(self, owner: Pubkey) -> list[tuple[Pubkey, TokenAccount]]:
        with self._lock:
            found = []
            for address, acc in self.svm.get_program_accounts(TOKEN_PROGRAM_ID):
                if len(acc.data) == TOKEN_ACCOUNT_SIZE:
                    state = TokenAccount.from_bytes(bytes(acc.data))
                    if state.owner == owner:
                        found.append((address, state))
            return sorted(found, key=lambda item: str(item[0]))

    def _token_balances(self, keys: list[Pubkey]) -> list[TokenBalance]:
        balances = []
        for index, key in enumerate(keys):
            state = self.token_account(key)
            if state is None:
                continue
            decimals = self.mint_decimals(state.mint)
            if decimals is None:
                continue
            balances.append(TokenBalance(index, state.mint, state.owner, state.amount, decimals))
        return balances

    # ---- sending ---------------------------------------------------------------------

    def send(self, raw: bytes, *, skip_preflight: bool = False) -> Signature:
        """Process a serialized transaction like a node's sendTransaction.

        Raises ``SendRejected`` with the node's error when preflight (or decoding, or
        signature verification) fails. With ``skip_preflight`` a transaction that cannot
        load (bad blockhash, duplicate, fee payer without funds) is answered with its
        signature and never lands, as on a cluster; one that fails while executing lands
        with ``meta.err`` set and only its fee charged.
        """
        try:
            vtx = VersionedTransaction.from_bytes(raw)
        except (ValueError, TypeError) as exc:
            raise SendRejected(
                -32602,
                f"failed to deserialize solana_transaction::versioned::VersionedTransaction: {exc}",
            ) from exc
        if not vtx.signatures or not all(vtx.verify_with_results()):
            raise SendRejected(-32003, "Transaction signature verification failure")
        signature = vtx.signatures[0]
        with self._lock:
            load_error: Any = None
            if signature in self._by_signature:
                load_error = "AlreadyProcessed"
            elif not self.blockhash_valid(vtx.message.recent_blockhash):
                load_error = "BlockhashNotFound"
            if load_error is not None:
                if skip_preflight:
                    return signature
                raise self._preflight_error(load_error, [], 0)
            if not skip_preflight:
                simulated = self.svm.simulate_transaction(vtx)
                if isinstance(simulated, FailedTransactionMetadata):
                    meta = simulated.meta()
                    raise self._preflight_error(
                        json.loads(simulated.to_json())["err"],
                        list(meta.logs()),
                        meta.compute_units_consumed(),
                    )
            loaded_writable, loaded_readonly = self._loaded_addresses(vtx)
            static = list(vtx.message.account_keys)
            keys = [*static, *loaded_writable, *loaded_readonly]
            written = [k for i, k in enumerate(static) if is_writable(vtx.message, i)]
            undo = [(k, self.svm.get_account(k)) for k in dict.fromkeys(written + loaded_writable)]
            pre_balances = [self.svm.get_balance(k) or 0 for k in keys]
            pre_tokens = self._token_balances(keys)
            result = self.svm.send_transaction(vtx)
            post_balances = [self.svm.get_balance(k) or 0 for k in keys]
            if isinstance(result, FailedTransactionMetadata):
                err = json.loads(result.to_json())["err"]
                meta = result.meta()
                if post_balances == pre_balances:
                    # Nothing was charged: the transaction could not load, so it never
                    # lands (preflight would have caught it without skip_preflight).
                    if skip_preflight:
                        return signature
                    raise self._preflight_error(err, list(meta.logs()), 0)
            else:
                err = None
                meta = result
            block = self.tip_block()
            record = RecordedTx(
                signature=signature,
                tx=vtx,
                slot=block.slot,
                err=err,
                fee_lamports=meta.fee(),
                pre_balances=pre_balances,
                post_balances=post_balances,
                pre_token_balances=pre_tokens,
                post_token_balances=self._token_balances(keys),
                logs=list(meta.logs()),
                compute_units=meta.compute_units_consumed(),
                loaded_writable=tuple(loaded_writable),
                loaded_readonly=tuple(loaded_readonly),
                inner_instructions=_inner_instructions(meta),
            )
            block.txs.append(record)
            self._undo.setdefault(block.slot, []).append(undo)
            self._by_signature[signature] = record
            for key in dict.fromkeys(keys):
                self._by_address.setdefault(key, []).append(record)
            log.debug("solana_sim_tx", signature=str(signature), slot=block.slot, err=err)
            return signature

    def _loaded_addresses(self, vtx: VersionedTransaction) -> tuple[list[Pubkey], list[Pubkey]]:
        """Resolve a v0 message's lookup-table indexes (LiteSVM has already run them)."""
        writable: list[Pubkey] = []
        readonly: list[Pubkey] = []
        for lookup in getattr(vtx.message, "address_table_lookups", None) or []:
            acc = self.svm.get_account(lookup.account_key)
            if acc is None:
                continue
            raw = bytes(acc.data)[LOOKUP_TABLE_META_SIZE:]
            table = [Pubkey.from_bytes(raw[i : i + 32]) for i in range(0, len(raw) - 31, 32)]
            writable += [table[i] for i in bytes(lookup.writable_indexes) if i < len(table)]
            readonly += [table[i] for i in bytes(lookup.readonly_indexes) if i < len(table)]
        return writable, readonly

    @staticmethod
    def _preflight_error(err: Any, logs: list[str], units: int) -> SendRejected:
        return SendRejected(
            -32002,
            f"Transaction simulation failed: {tx_error_message(err)}",
            {
                "accounts": None,
                "err": err,
                "innerInstructions": None,
                "loadedAccountsDataSize": 0,
                "logs": logs,
                "replacementBlockhash": None,
                "returnData": None,
                "unitsConsumed": units,
            },
        )

    def sign_and_send(self, instructions: list[Any], signers: list[Keypair]) -> Signature:
        """Build, sign (first signer pays) and send a legacy transaction at the tip."""
        with self._lock:
            message = Message.new_with_blockhash(
                instructions, signers[0].pubkey(), self.tip_block().blockhash
            )
            vtx = VersionedTransaction(message, signers)
            return self.send(bytes(vtx))

    # ---- helpers for tests and the dev demo -----------------------------------------

    def airdrop(self, to: Pubkey, lamports: int) -> Signature:
        """A faucet transfer, recorded like any transaction (a node's requestAirdrop)."""
        assert lamports > 0
        ix = transfer(
            TransferParams(from_pubkey=self.faucet.pubkey(), to_pubkey=to, lamports=lamports)
        )
        return self.sign_and_send([ix], [self.faucet])

    def create_mint(self, decimals: int, mint_authority: Keypair | None = None) -> Pubkey:
        """A new SPL mint; the simulator's ``mint_authority`` keypair may mint it."""
        authority = mint_authority or self.mint_authority
        mint = Keypair()
        rent = self.rent_exempt_minimum(MINT_SIZE)
        self.sign_and_send(
            [
                create_account(
                    CreateAccountParams(
                        from_pubkey=self.faucet.pubkey(),
                        to_pubkey=mint.pubkey(),
                        lamports=rent,
                        space=MINT_SIZE,
                        owner=TOKEN_PROGRAM_ID,
                    )
                ),
                initialize_mint2(
                    InitializeMint2Params(
                        decimals=decimals,
                        program_id=TOKEN_PROGRAM_ID,
                        mint=mint.pubkey(),
                        mint_authority=authority.pubkey(),
                    )
                ),
            ],
            [self.faucet, mint],
        )
        return mint.pubkey()

    def create_usdc_mint(self, decimals: int = 6) -> Pubkey:
        self.usdc_mint = self.create_mint(decimals)
        return self.usdc_mint

    def ensure_token_account(self, mint: Pubkey, owner: Pubkey) -> Pubkey:
        """The owner's associated token account, created (faucet pays) if missing."""
        ata = get_associated_token_address(owner, mint)
        if self.token_account(ata) is None:
            self.sign_and_send(
                [create_idempotent_associated_token_account(self.faucet.pubkey(), owner, mint)],
                [self.faucet],
            )
        return ata

    def mint_to(self, mint: Pubkey, owner: Pubkey, amount_base_units: int) -> Signature:
        """Mint to the owner's associated token account (created first if needed)."""
        assert amount_base_units > 0
        decimals = self.mint_decimals(mint)
        assert decimals is not None, "not a mint"
        ata = self.ensure_token_account(mint, owner)
        ix = mint_to_checked(
            MintToCheckedParams(
                program_id=TOKEN_PROGRAM_ID,
                mint=mint,
                dest=ata,
                mint_authority=self.mint_authority.pubkey(),
                amount=amount_base_units,
                decimals=decimals,
            )
        )
        return self.sign_and_send([ix], [self.faucet, self.mint_authority])

    def transfer_token(
        self, sender: Keypair, mint: Pubkey, recipient: Pubkey, amount_base_units: int
    ) -> Signature:
        """TransferChecked between associated token accounts, paid by the sender.

        The recipient's token account is created in a separate transaction first, so
        the transfer lists the recipient's token account but not the recipient wallet,
        like most real wallet transfers.
        """
        decimals = self.mint_decimals(mint)
        assert decimals is not None, "not a mint"
        dest = self.ensure_token_account(mint, recipient)
        ix = transfer_checked(
            TransferCheckedParams(
                program_id=TOKEN_PROGRAM_ID,
                source=get_associated_token_address(sender.pubkey(), mint),
                mint=mint,
                dest=dest,
                owner=sender.pubkey(),
                amount=amount_base_units,
                decimals=decimals,
            )
        )
        return self.sign_and_send([ix], [sender])

    def transfer_sol(self, sender: Keypair, to: Pubkey, lamports: int) -> Signature:
        ix = transfer(TransferParams(from_pubkey=sender.pubkey(), to_pubkey=to, lamports=lamports))
        return self.sign_and_send([ix], [sender])

    def add_filler_transactions(self, n_transactions: int) -> None:
        """``n_transactions`` unrelated SOL transfers into the tip block, so blocks can be
        as large as mainnet's (1,000-3,000 transactions); about 0.4 ms each."""
        with self._lock:
            if not self._fillers:
                self._fillers = [Keypair() for _ in range(8)]
                for payer in self._fillers:
                    self.airdrop(payer.pubkey(), FAUCET_LAMPORTS // 100)
            for i in range(n_transactions):
                # Each amount differs, so no two transactions of a block are identical.
                payer = self._fillers[i % len(self._fillers)]
                self.transfer_sol(payer, Keypair().pubkey(), 1_000_000 + i)


def _token_amount(balances: list[TokenBalance], account_index: int) -> int:
    return next((b.amount_base_units for b in balances if b.account_index == account_index), 0)


def _inner_instructions(
    meta: TransactionMetadata,
) -> tuple[tuple[int, tuple[InnerIx, ...]], ...]:
    found = []
    for index, invoked in enumerate(meta.inner_instructions()):
        if invoked:
            found.append((index, tuple(_inner_ix(inner) for inner in invoked)))
    return tuple(found)


def _inner_ix(inner: InnerInstruction) -> InnerIx:
    ix = inner.instruction()
    return InnerIx(ix.program_id_index, bytes(ix.accounts), bytes(ix.data), inner.stack_height())


__all__ = [
    "ASSOCIATED_TOKEN_PROGRAM_ID",
    "COMMITMENTS",
    "SYSTEM_PROGRAM_ID",
    "TOKEN_PROGRAM_ID",
    "Block",
    "InnerIx",
    "RecordedTx",
    "SendRejected",
    "SolanaChain",
    "TokenBalance",
    "is_writable",
    "tx_error_message",
]
