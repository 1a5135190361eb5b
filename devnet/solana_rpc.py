"""A local Solana JSON-RPC node: HTTP in front of ``devnet.solana_chain.SolanaChain``.

Answers the methods escrowd uses in a real node's wire format (result shapes,
``context`` wrappers, error codes and messages), so the real ``solana`` client can be
tested against it. Run in-process (``SolanaSimulator``) or as ``escrowd devnet solana``.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import base58
import structlog
from solders.account import Account
from solders.hash import Hash
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.token.state import Mint, TokenAccount

from escrowd.devnet.solana_chain import (
    ASSOCIATED_TOKEN_PROGRAM_ID,
    COMMITMENTS,
    MINT_SIZE,
    STATUS_CACHE_SLOTS,
    SYSTEM_PROGRAM_ID,
    TOKEN_ACCOUNT_SIZE,
    TOKEN_PROGRAM_ID,
    Block,
    InnerIx,
    RecordedTx,
    SendRejected,
    SolanaChain,
    TokenBalance,
    is_writable,
)
from escrowd.devnet.solana_faults import FaultSpecError, SolanaFaults, error_message

log = structlog.get_logger(__name__)

API_VERSION = "2.1.21"
FEATURE_SET = 3271415109
MAX_SIGNATURES_LIMIT = 1000
MAX_BLOCKS_RANGE = 500_000
MAX_MULTIPLE_ACCOUNTS = 100
MAX_STATUS_SIGNATURES = 256
FAULTS_PATH = "/simulator/faults"
MAX_REQUEST_BYTES = 5 * 1024 * 1024
U64_MAX = 2**64 - 1


class RpcFault(Exception):
    """A JSON-RPC error answer (code, message, optional data)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def invalid_params(detail: str) -> RpcFault:
    return RpcFault(-32602, f"Invalid params: {detail}.")


def ui_amount_string(amount_base_units: int, decimals: int) -> str:
    """The node's trimmed decimal string (``real_number_string_trimmed``)."""
    if decimals == 0:
        return str(amount_base_units)
    whole, frac = divmod(amount_base_units, 10**decimals)
    frac_str = str(frac).rjust(decimals, "0").rstrip("0")
    return f"{whole}.{frac_str}" if frac_str else str(whole)


def ui_token_amount(
    amount_base_units: int, decimals: int, *, zero_is_null: bool = False
) -> dict[str, Any]:
    """``uiTokenAmount``. uiAmount is a float on the wire (deprecated, kept for
    compatibility); a transaction's stored token balances come back from the node's
    ledger with a zero uiAmount as null (``zero_is_null``), account data with 0.0."""
    text = ui_amount_string(amount_base_units, decimals)
    ui_amount = None if zero_is_null and amount_base_units == 0 else float(text)
    return {
        "amount": str(amount_base_units),
        "decimals": decimals,
        "uiAmount": ui_amount,
        "uiAmountString": text,
    }


# ---- parameter parsing -------------------------------------------------------------


def _param(params: list[Any], index: int, required: bool = True) -> Any:
    if index < len(params):
        return params[index]
    if required:
        raise invalid_params(f"missing parameter {index}")
    return None


def _pubkey(value: Any) -> Pubkey:
    if not isinstance(value, str):
        raise invalid_params("invalid type: expected a base-58 encoded public key string")
    try:
        return Pubkey.from_string(value)
    except ValueError:
        raise RpcFault(-32602, "Invalid param: Invalid") from None


def _signature(value: Any) -> Signature:
    if not isinstance(value, str):
        raise invalid_params("invalid type: expected a base-58 encoded signature string")
    try:
        return Signature.from_string(value)
    except ValueError:
        raise RpcFault(-32602, "Invalid param: Invalid") from None


def _u64(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise invalid_params(f"invalid type: expected u64 for {name}")
    return value


def _config(params: list[Any], index: int) -> dict[str, Any]:
    value = _param(params, index, required=False)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid_params("invalid type: expected a configuration map")
    # Clients send absent options as null; the node treats them as absent.
    return {key: item for key, item in value.items() if item is not None}


def _commitment(config: dict[str, Any]) -> str:
    value = config.get("commitment", "finalized")
    if value not in COMMITMENTS:
        raise invalid_params(f"unknown variant `{value}`, expected one of {COMMITMENTS}")
    return str(value)


def _at_least_confirmed(config: dict[str, Any]) -> str:
    commitment = _commitment(config)
    if commitment == "processed":
        raise RpcFault(-32602, "Method does not support commitment below `confirmed`")
    return commitment


# ---- encoding ----------------------------------------------------------------------


def _account_json(
    acc: Account,
    encoding: str,
    chain: SolanaChain,
    data_slice: tuple[int, int] | None = None,
) -> dict[str, Any]:
    data = bytes(acc.data)
    shown = data if data_slice is None else data[data_slice[0] : data_slice[0] + data_slice[1]]
    encoded: Any = [base64.b64encode(shown).decode(), "base64"]
    if encoding == "base58":
        encoded = [base58.b58encode(shown).decode(), "base58"]
    elif encoding == "jsonParsed" and data_slice is None:
        parsed = _parse_token_state(acc, chain)
        if parsed is not None:
            encoded = {"parsed": parsed, "program": "spl-token", "space": len(data)}
    return {
        "data": encoded,
        "executable": acc.executable,
        "lamports": acc.lamports,
        "owner": str(acc.owner),
        "rentEpoch": acc.rent_epoch,
        "space": len(data),
    }


def _parse_token_state(acc: Account, chain: SolanaChain) -> dict[str, Any] | None:
    """The account's own bytes parsed (also a past state a lagging replica serves)."""
    if acc.owner != TOKEN_PROGRAM_ID:
        return None
    data = bytes(acc.data)
    if len(data) == TOKEN_ACCOUNT_SIZE:
        state = TokenAccount.from_bytes(data)
        decimals = chain.mint_decimals(state.mint) or 0
        return {
            "info": {
                "isNative": state.is_native is not None,
                "mint": str(state.mint),
                "owner": str(state.owner),
                "state": "initialized",
                "tokenAmount": ui_token_amount(state.amount, decimals),
            },
            "type": "account",
        }
    if len(data) != MINT_SIZE:
        return None
    mint = Mint.from_bytes(data)
    return {
        "info": {
            "decimals": mint.decimals,
            "freezeAuthority": str(mint.freeze_authority) if mint.freeze_authority else None,
            "isInitialized": mint.is_initialized,
            "mintAuthority": str(mint.mint_authority) if mint.mint_authority else None,
            "supply": str(mint.supply),
        },
        "type": "mint",
    }


def _token_balance_json(balance: TokenBalance) -> dict[str, Any]:
    return {
        "accountIndex": balance.account_index,
        "mint": str(balance.mint),
        "owner": str(balance.owner),
        "programId": str(TOKEN_PROGRAM_ID),
        "uiTokenAmount": ui_token_amount(
            balance.amount_base_units, balance.decimals, zero_is_null=True
        ),
    }


def _parsed_instruction(
    program: Pubkey, accounts: list[Pubkey], data: bytes, chain: SolanaChain
) -> dict[str, Any] | None:
    """``jsonParsed`` forms of the instructions escrowd meets; None for the rest."""
    acct = [str(a) for a in accounts]
    if program == SYSTEM_PROGRAM_ID and len(data) >= 4:
        kind = int.from_bytes(data[:4], "little")
        if kind == 2 and len(data) == 12 and len(acct) >= 2:
            lamports = int.from_bytes(data[4:12], "little")
            info: dict[str, Any] = {"destination": acct[1], "lamports": lamports, "source": acct[0]}
            return {"program": "system", "type": "transfer", "info": info}
        if kind == 0 and len(data) == 52 and len(acct) >= 2:
            info = {
                "lamports": int.from_bytes(data[4:12], "little"),
                "newAccount": acct[1],
                "owner": str(Pubkey.from_bytes(data[20:52])),
                "source": acct[0],
                "space": int.from_bytes(data[12:20], "little"),
            }
            return {"program": "system", "type": "createAccount", "info": info}
    if program == TOKEN_PROGRAM_ID and data:
        kind = data[0]
        if kind in (3, 12) and len(data) >= 9:
            amount = int.from_bytes(data[1:9], "little")
            if kind == 3 and len(acct) >= 3:
                info = {
                    "amount": str(amount),
                    "authority": acct[2],
                    "destination": acct[1],
                    "source": acct[0],
                }
                return {"program": "spl-token", "type": "transfer", "info": info}
            if kind == 12 and len(data) == 10 and len(acct) >= 4:
                info = {
                    "authority": acct[3],
                    "destination": acct[2],
                    "mint": acct[1],
                    "source": acct[0],
                    "tokenAmount": ui_token_amount(amount, data[9]),
                }
                return {"program": "spl-token", "type": "transferChecked", "info": info}
        if kind == 14 and len(data) == 10 and len(acct) >= 3:
            info = {
                "account": acct[1],
                "mint": acct[0],
                "mintAuthority": acct[2],
                "tokenAmount": ui_token_amount(int.from_bytes(data[1:9], "little"), data[9]),
            }
            return {"program": "spl-token", "type": "mintToChecked", "info": info}
        if kind == 20 and len(data) >= 34 and acct:
            info = {
                "decimals": data[1],
                "mint": acct[0],
                "mintAuthority": str(Pubkey.from_bytes(data[2:34])),
            }
            return {"program": "spl-token", "type": "initializeMint2", "info": info}
    if program == ASSOCIATED_TOKEN_PROGRAM_ID and len(acct) >= 6 and len(data) <= 1:
        kind_name = "createIdempotent" if data == b"\x01" else "create"
        info = {
            "account": acct[1],
            "mint": acct[3],
            "source": acct[0],
            "systemProgram": acct[4],
            "tokenProgram": acct[5],
            "wallet": acct[2],
        }
        return {"program": "spl-associated-token-account", "type": kind_name, "info": info}
    return None


def _encode_instruction(
    ix: InnerIx, keys: list[Pubkey], encoding: str, chain: SolanaChain
) -> dict[str, Any]:
    """One instruction; top-level ones have no stack height on the wire (null)."""
    program_id_index, account_indexes, data = ix.program_id_index, list(ix.accounts), ix.data
    stack_height = ix.stack_height
    program = keys[program_id_index]
    if encoding != "jsonParsed":
        return {
            "accounts": account_indexes,
            "data": base58.b58encode(data).decode(),
            "programIdIndex": program_id_index,
            "stackHeight": stack_height,
        }
    parsed = _parsed_instruction(program, [keys[i] for i in account_indexes], data, chain)
    if parsed is not None:
        return {
            "parsed": {"info": parsed["info"], "type": parsed["type"]},
            "program": parsed["program"],
            "programId": str(program),
            "stackHeight": stack_height,
        }
    return {
        "accounts": [str(keys[i]) for i in account_indexes],
        "data": base58.b58encode(data).decode(),
        "programId": str(program),
        "stackHeight": stack_height,
    }


def encode_transaction(record: RecordedTx, encoding: str, chain: SolanaChain) -> dict[str, Any]:
    message = record.tx.message
    keys = record.account_keys
    header = message.header
    instructions = [
        _encode_instruction(
            InnerIx(ix.program_id_index, bytes(ix.accounts), bytes(ix.data), None),
            keys,
            encoding,
            chain,
        )
        for ix in message.instructions
    ]
    if encoding == "jsonParsed":
        account_keys: list[Any] = [
            {
                "pubkey": str(key),
                "signer": i < header.num_required_signatures,
                "source": "transaction",
                "writable": is_writable(message, i),
            }
            for i, key in enumerate(message.account_keys)
        ]
        account_keys += [
            {"pubkey": str(key), "signer": False, "source": "lookupTable", "writable": True}
            for key in record.loaded_writable
        ]
        account_keys += [
            {"pubkey": str(key), "signer": False, "source": "lookupTable", "writable": False}
            for key in record.loaded_readonly
        ]
        msg: dict[str, Any] = {
            "accountKeys": account_keys,
            "instructions": instructions,
            "recentBlockhash": str(message.recent_blockhash),
        }
    else:
        msg = {
            "accountKeys": [str(k) for k in message.account_keys],
            "header": {
                "numReadonlySignedAccounts": header.num_readonly_signed_accounts,
                "numReadonlyUnsignedAccounts": header.num_readonly_unsigned_accounts,
                "numRequiredSignatures": header.num_required_signatures,
            },
            "instructions": instructions,
            "recentBlockhash": str(message.recent_blockhash),
        }
    lookups = getattr(message, "address_table_lookups", None)
    if lookups is not None:
        msg["addressTableLookups"] = [
            {
                "accountKey": str(lookup.account_key),
                "readonlyIndexes": list(bytes(lookup.readonly_indexes)),
                "writableIndexes": list(bytes(lookup.writable_indexes)),
            }
            for lookup in lookups
        ]
    return {"message": msg, "signatures": [str(s) for s in record.tx.signatures]}


def encode_meta(record: RecordedTx, encoding: str, chain: SolanaChain) -> dict[str, Any]:
    keys = record.account_keys
    inner = [
        {
            "index": index,
            "instructions": [_encode_instruction(ix, keys, encoding, chain) for ix in invoked],
        }
        for index, invoked in record.inner_instructions
    ]
    meta: dict[str, Any] = {
        "computeUnitsConsumed": record.compute_units,
        "err": record.err,
        "fee": record.fee_lamports,
        "innerInstructions": inner,
        "logMessages": record.logs,
        "postBalances": record.post_balances,
        "postTokenBalances": [_token_balance_json(b) for b in record.post_token_balances],
        "preBalances": record.pre_balances,
        "preTokenBalances": [_token_balance_json(b) for b in record.pre_token_balances],
        "rewards": [],
        "status": {"Ok": None} if record.err is None else {"Err": record.err},
    }
    if encoding != "jsonParsed":
        meta["loadedAddresses"] = {
            "readonly": [str(k) for k in record.loaded_readonly],
            "writable": [str(k) for k in record.loaded_writable],
        }
    return meta


def _accounts_only(record: RecordedTx, chain: SolanaChain) -> dict[str, Any]:
    """A block entry for ``transactionDetails: accounts``: keys, signatures, balances."""
    full = encode_meta(record, "jsonParsed", chain)
    meta_keys = ("err", "fee", "postBalances", "postTokenBalances", "preBalances")
    meta = {key: full[key] for key in (*meta_keys, "preTokenBalances", "status")}
    parsed = encode_transaction(record, "jsonParsed", chain)
    transaction = {
        "accountKeys": parsed["message"]["accountKeys"],
        "signatures": parsed["signatures"],
    }
    return {"meta": meta, "transaction": transaction}


def _tx_version(record: RecordedTx) -> Any:
    return 0 if hasattr(record.tx.message, "address_table_lookups") else "legacy"


def _check_version(record: RecordedTx, config: dict[str, Any]) -> bool:
    """True when the caller asked for ``maxSupportedTransactionVersion`` (adds ``version``)."""
    max_version = config.get("maxSupportedTransactionVersion")
    version = _tx_version(record)
    if max_version is None:
        if version != "legacy":
            raise RpcFault(
                -32015,
                f"Transaction version ({version}) is not supported by the requesting client. "
                "Please try the request again with the following configuration parameter: "
                '"maxSupportedTransactionVersion": 0',
            )
        return False
    if not isinstance(max_version, int) or max_version < 0:
        raise invalid_params("invalid type: expected u8 for maxSupportedTransactionVersion")
    if version != "legacy" and version > max_version:
        raise RpcFault(-32015, f"Transaction version ({version}) is not supported")
    return True


def _tx_encoding(config: dict[str, Any]) -> str:
    encoding = config.get("encoding", "json")
    if encoding not in ("json", "jsonParsed"):
        raise invalid_params(
            f"unsupported encoding `{encoding}` (this simulator serves json and jsonParsed)"
        )
    return str(encoding)


class SolanaRpcHandler:
    """Dispatches JSON-RPC requests to the chain. No HTTP here, except that the caller
    asks `faults` whether to answer 429 first.

    Each request is answered from one replica: an up-to-date one, or (fault switch) one
    ``faults.lag_slots`` behind the tip; ``_behind()`` says which for this request.
    """

    def __init__(self, chain: SolanaChain, faults: SolanaFaults | None = None) -> None:
        self.chain = chain
        self.faults = faults or SolanaFaults()
        self._request = threading.local()
        self.methods: dict[str, Callable[[list[Any]], Any]] = {
            "getHealth": lambda params: "ok",
            "getVersion": lambda params: {"feature-set": FEATURE_SET, "solana-core": API_VERSION},
            "getSlot": self.get_slot,
            "getBlockHeight": self.get_block_height,
            "getLatestBlockhash": self.get_latest_blockhash,
            "isBlockhashValid": self.is_blockhash_valid,
            "getBalance": self.get_balance,
            "getAccountInfo": self.get_account_info,
            "getMultipleAccounts": self.get_multiple_accounts,
            "getTokenAccountsByOwner": self.get_token_accounts_by_owner,
            "getTokenAccountBalance": self.get_token_account_balance,
            "getMinimumBalanceForRentExemption": self.get_minimum_balance_for_rent_exemption,
            "getSignaturesForAddress": self.get_signatures_for_address,
            "getBlocks": self.get_blocks,
            "getBlocksWithLimit": self.get_blocks_with_limit,
            "getFirstAvailableBlock": lambda params: self.chain.first_available_block,
            "getTransaction": self.get_transaction,
            "getBlock": self.get_block,
            "getSignatureStatuses": self.get_signature_statuses,
            "sendTransaction": self.send_transaction,
            "requestAirdrop": self.request_airdrop,
        }

    # ---- envelope ----------------------------------------------------------------

    def handle_body(self, body: bytes) -> Any:
        """One HTTP body in, the JSON value to answer (None: nothing to send)."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _error(None, RpcFault(-32700, "Parse error"))
        # A batch goes to one replica, as behind a load balancer.
        self._request.behind = self.faults.behind_slots()
        if isinstance(request, list):
            if not request:
                return _error(None, RpcFault(-32600, "Invalid request"))
            return [self.handle_one(item) for item in request]
        return self.handle_one(request)

    def throttled(self, body: bytes) -> int | None:
        """Retry-After seconds when a 429 fault answers this HTTP request instead."""
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        items = request if isinstance(request, list) else [request]
        for item in items:
            method = item.get("method") if isinstance(item, dict) else None
            if isinstance(method, str):
                rule = self.faults.take("http_429", method)
                if rule is not None:
                    return rule.retry_after_s
        return None

    def handle_one(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            return _error(None, RpcFault(-32600, "Invalid request"))
        req_id = request.get("id")
        method = request.get("method")
        params = request.get("params", [])
        if request.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return _error(req_id, RpcFault(-32600, "Invalid request"))
        handler = self.methods.get(method)
        if handler is None:
            return _error(req_id, RpcFault(-32601, "Method not found"))
        if params is None:
            params = []
        if not isinstance(params, list):
            return _error(req_id, invalid_params("invalid type: map, expected a sequence"))
        try:
            injected = self.faults.take("error", method)
            if injected is not None:
                assert injected.code is not None
                raise self._injected_error(injected.code, params)
            result = handler(params)
            if self.faults.take("null", method) is not None:
                result = self._nulled(method, result)
            return {"jsonrpc": "2.0", "result": result, "id": req_id}
        except RpcFault as fault:
            return _error(req_id, fault)
        except SendRejected as rejected:
            return _error(req_id, RpcFault(rejected.code, rejected.message, rejected.data))
        except Exception as exc:  # a simulator bug must answer, not kill the server
            log.exception("solana_sim_internal_error", method=method)
            return _error(req_id, RpcFault(-32603, f"Internal error: {type(exc).__name__}"))

    def _injected_error(self, code: int, params: list[Any]) -> RpcFault:
        first = params[0] if params else None
        if code == -32016:
            slot = self._slot("confirmed")
        elif isinstance(first, int) and not isinstance(first, bool):
            slot = first
        else:
            slot = self._slot("confirmed")
        message, data = error_message(code, slot, self.chain.first_available_block)
        return RpcFault(code, message, data)

    @staticmethod
    def _nulled(method: str, result: Any) -> Any:
        if method == "getSignatureStatuses":
            return {**result, "value": [None for _ in result["value"]]}
        return None

    def _context(self, slot: int, value: Any) -> dict[str, Any]:
        return {"context": {"apiVersion": API_VERSION, "slot": slot}, "value": value}

    # ---- the replica answering this request -------------------------------------------

    def _behind(self) -> int:
        return int(getattr(self._request, "behind", 0))

    def _slot(self, commitment: str) -> int:
        return self.chain.commitment_slot(commitment, self._behind())

    def _bank_slot(self, config: dict[str, Any], commitment: str | None = None) -> int:
        """The slot of the bank answering at the config's commitment, refusing with
        -32016 when it is below the config's minContextSlot."""
        slot = self._slot(commitment or _commitment(config))
        minimum = config.get("minContextSlot")
        if minimum is not None and slot < _u64(minimum, "minContextSlot"):
            message, data = error_message(-32016, slot, self.chain.first_available_block)
            raise RpcFault(-32016, message, data)
        return slot

    def _visible(self, record: RecordedTx, max_slot: int) -> bool:
        return record.slot <= max_slot and not self.chain.is_pruned(record.slot)

    # ---- methods -------------------------------------------------------------------

    def get_slot(self, params: list[Any]) -> int:
        return self._bank_slot(_config(params, 0))

    def get_block_height(self, params: list[Any]) -> int:
        block = self.chain.block(self._bank_slot(_config(params, 0)))
        assert block is not None
        return block.block_height

    def get_latest_blockhash(self, params: list[Any]) -> dict[str, Any]:
        block = self.chain.block(self._bank_slot(_config(params, 0)))
        assert block is not None
        value = {
            "blockhash": str(block.blockhash),
            "lastValidBlockHeight": block.block_height + self.chain.blockhash_valid_blocks,
        }
        return self._context(block.slot, value)

    def is_blockhash_valid(self, params: list[Any]) -> dict[str, Any]:
        raw = _param(params, 0)
        config = _config(params, 1)
        try:
            blockhash = Hash.from_string(raw) if isinstance(raw, str) else None
        except ValueError:
            blockhash = None
        if blockhash is None:
            raise RpcFault(-32602, "Invalid param: Invalid")
        slot = self._bank_slot(config)
        valid = self.chain.blockhash_valid(blockhash)
        return self._context(slot, valid)

    def get_balance(self, params: list[Any]) -> dict[str, Any]:
        address = _pubkey(_param(params, 0))
        slot = self._bank_slot(_config(params, 1))
        return self._context(slot, self.chain.balance_at(address, slot))

    def _encoding(self, config: dict[str, Any]) -> str:
        encoding = config.get("encoding", "base58")
        if encoding not in ("base58", "base64", "jsonParsed"):
            raise invalid_params(f"unsupported encoding `{encoding}`")
        return str(encoding)

    @staticmethod
    def _data_slice(config: dict[str, Any]) -> tuple[int, int] | None:
        raw = config.get("dataSlice")
        if raw is None:
            return None
        if not isinstance(raw, dict) or set(raw) != {"offset", "length"}:
            raise invalid_params("dataSlice is a map with `offset` and `length`")
        return _u64(raw["offset"], "offset"), _u64(raw["length"], "length")

    def get_account_info(self, params: list[Any]) -> dict[str, Any]:
        address = _pubkey(_param(params, 0))
        config = _config(params, 1)
        slot = self._bank_slot(config)
        encoding, data_slice = self._encoding(config), self._data_slice(config)
        acc = self.chain.account_at(address, slot)
        value = None if acc is None else _account_json(acc, encoding, self.chain, data_slice)
        return self._context(slot, value)

    def get_multiple_accounts(self, params: list[Any]) -> dict[str, Any]:
        raw = _param(params, 0)
        if not isinstance(raw, list):
            raise invalid_params("invalid type: expected a sequence of public keys")
        if len(raw) > MAX_MULTIPLE_ACCOUNTS:
            raise RpcFault(-32602, f"Too many inputs provided; max {MAX_MULTIPLE_ACCOUNTS}")
        addresses = [_pubkey(item) for item in raw]
        config = _config(params, 1)
        slot = self._bank_slot(config)
        encoding, data_slice = self._encoding(config), self._data_slice(config)
        value = []
        for address in addresses:
            acc = self.chain.account_at(address, slot)
            shown = None if acc is None else _account_json(acc, encoding, self.chain, data_slice)
            value.append(shown)
        return self._context(slot, value)

    def get_token_accounts_by_owner(self, params: list[Any]) -> dict[str, Any]:
        owner = _pubkey(_param(params, 0))
        token_filter = _param(params, 1)
        config = _config(params, 2)
        slot = self._bank_slot(config)
        encoding = self._encoding(config)
        if not isinstance(token_filter, dict) or len(token_filter) != 1:
            raise invalid_params("expected a map with one of `mint` or `programId`")
        mint: Pubkey | None = None
        if "mint" in token_filter:
            mint = _pubkey(token_filter["mint"])
            if self.chain.mint_decimals(mint) is None:
                raise RpcFault(-32602, "Invalid param: could not find mint")
        elif "programId" in token_filter:
            if _pubkey(token_filter["programId"]) != TOKEN_PROGRAM_ID:
                raise RpcFault(-32602, "Invalid param: unrecognized Token program id")
        else:
            raise invalid_params("expected a map with one of `mint` or `programId`")
        value = []
        for address, state in self.chain.token_accounts_of(owner):
            if mint is not None and state.mint != mint:
                continue
            acc = self.chain.account_at(address, slot)
            if acc is None:
                continue  # created after the slot this bank is at
            account = _account_json(acc, encoding, self.chain)
            value.append({"account": account, "pubkey": str(address)})
        return self._context(slot, value)

    def get_token_account_balance(self, params: list[Any]) -> dict[str, Any]:
        address = _pubkey(_param(params, 0))
        slot = self._bank_slot(_config(params, 1))
        acc = self.chain.account_at(address, slot)
        data = bytes(acc.data) if acc is not None else b""
        if acc is None or acc.owner != TOKEN_PROGRAM_ID or len(data) != TOKEN_ACCOUNT_SIZE:
            raise RpcFault(-32602, "Invalid param: not a Token account")
        state = TokenAccount.from_bytes(data)
        decimals = self.chain.mint_decimals(state.mint) or 0
        return self._context(slot, ui_token_amount(state.amount, decimals))

    def get_minimum_balance_for_rent_exemption(self, params: list[Any]) -> int:
        size = _u64(_param(params, 0), "data length")
        return self.chain.rent_exempt_minimum(size)

    def get_signatures_for_address(self, params: list[Any]) -> list[dict[str, Any]]:
        address = _pubkey(_param(params, 0))
        config = _config(params, 1)
        max_slot = self._bank_slot(config, _at_least_confirmed(config))
        limit = config.get("limit", MAX_SIGNATURES_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise invalid_params("invalid type: expected usize for limit")
        if limit > MAX_SIGNATURES_LIMIT:
            raise RpcFault(-32602, f"Invalid limit; max {MAX_SIGNATURES_LIMIT}")
        before = _signature(config["before"]) if config.get("before") else None
        until = _signature(config["until"]) if config.get("until") else None
        if before is not None and self.faults.take("empty_before", "getSignaturesForAddress"):
            return []  # a replica that does not have `before` (yet)
        records = [r for r in self.chain.signatures_for(address) if self._visible(r, max_slot)]
        records.reverse()
        if before is not None:
            positions = [i for i, r in enumerate(records) if r.signature == before]
            records = records[positions[0] + 1 :] if positions else []
        result: list[dict[str, Any]] = []
        for record in records:
            if until is not None and record.signature == until:
                break
            if len(result) == limit:
                break
            result.append(self._signature_info(record))
        return result

    def _signature_info(self, record: RecordedTx) -> dict[str, Any]:
        block = self.chain.block(record.slot)
        assert block is not None
        return {
            "blockTime": block.block_time,
            "confirmationStatus": self._confirmation_status(record.slot),
            "err": record.err,
            "memo": None,
            "signature": str(record.signature),
            "slot": record.slot,
        }

    def _confirmation_status(self, slot: int) -> str:
        if slot <= self._slot("finalized"):
            return "finalized"
        if slot <= self._slot("confirmed"):
            return "confirmed"
        return "processed"

    def _blocks_end(self, config: dict[str, Any]) -> int:
        commitment = _at_least_confirmed(config)
        if commitment == "finalized":
            return self._bank_slot(config, "finalized")
        self._bank_slot(config, "confirmed")
        return self._slot("confirmed")

    def get_blocks(self, params: list[Any]) -> list[int]:
        start = _u64(_param(params, 0), "start slot")
        end_param = _param(params, 1, required=False)
        config = _config(params, 2)
        if isinstance(end_param, dict):
            config, end_param = end_param, None
        # Without an end slot the node caps the range; with one it refuses a long range.
        wanted = start + MAX_BLOCKS_RANGE if end_param is None else _u64(end_param, "end slot")
        end = min(wanted, self._blocks_end(config))
        if end < start:
            return []
        if end - start > MAX_BLOCKS_RANGE:
            raise RpcFault(-32602, f"Slot range too large; max {MAX_BLOCKS_RANGE}")
        return self.chain.produced_slots(max(start, self.chain.first_available_block), end)

    def get_blocks_with_limit(self, params: list[Any]) -> list[int]:
        start = _u64(_param(params, 0), "start slot")
        limit = _u64(_param(params, 1), "limit")
        config = _config(params, 2)
        if limit > MAX_BLOCKS_RANGE:
            raise RpcFault(-32602, f"Limit too large; max {MAX_BLOCKS_RANGE}")
        end = self._blocks_end(config)
        start = max(start, self.chain.first_available_block)
        return self.chain.produced_slots(start, end)[:limit]

    def get_transaction(self, params: list[Any]) -> dict[str, Any] | None:
        signature = _signature(_param(params, 0))
        config = _config(params, 1)
        if isinstance(_param(params, 1, required=False), str):
            config = {"encoding": params[1]}
        encoding = _tx_encoding(config)
        max_slot = self._slot(_at_least_confirmed(config))
        record = self.chain.transaction(signature)
        if record is None or not self._visible(record, max_slot):
            return None
        with_version = _check_version(record, config)
        block = self.chain.block(record.slot)
        assert block is not None
        result = {
            "blockTime": block.block_time,
            "meta": encode_meta(record, encoding, self.chain),
            "slot": record.slot,
            "transaction": encode_transaction(record, encoding, self.chain),
        }
        if with_version:
            result["version"] = _tx_version(record)
        return result

    def get_block(self, params: list[Any]) -> dict[str, Any]:
        slot = _u64(_param(params, 0), "slot")
        config = _config(params, 1)
        if isinstance(_param(params, 1, required=False), str):
            config = {"encoding": params[1]}
        encoding = _tx_encoding(config)
        details = config.get("transactionDetails", "full")
        if details not in ("full", "signatures", "none", "accounts"):
            raise invalid_params(f"unknown variant `{details}` for transactionDetails")
        commitment = _at_least_confirmed(config)
        block = self._block_for(slot, commitment)
        result: dict[str, Any] = {
            "blockHeight": block.block_height,
            "blockTime": block.block_time,
            "blockhash": str(block.blockhash),
            "parentSlot": block.parent_slot,
            "previousBlockhash": str(block.previous_blockhash),
        }
        if details in ("full", "accounts"):
            txs = []
            for record in block.txs:
                with_version = _check_version(record, config)
                if details == "accounts":
                    entry = _accounts_only(record, self.chain)
                else:
                    entry = {
                        "meta": encode_meta(record, encoding, self.chain),
                        "transaction": encode_transaction(record, encoding, self.chain),
                    }
                if with_version:
                    entry["version"] = _tx_version(record)
                txs.append(entry)
            result["transactions"] = txs
        elif details == "signatures":
            result["signatures"] = [str(r.signature) for r in block.txs]
        if config.get("rewards", True):
            result["rewards"] = []
        return result

    def _block_for(self, slot: int, commitment: str) -> Block:
        """A node's answer for a slot: the block, or the error its finality implies.

        At or below the finalized slot a missing block is known skipped (-32007) and a
        pruned one cleaned up (-32001); above it nothing is known yet (-32004), also for
        a slot that will turn out skipped."""
        finalized = self._slot("finalized")
        first_available = self.chain.first_available_block
        if slot <= finalized:
            if slot < first_available:
                message, _ = error_message(-32001, slot, first_available)
                raise RpcFault(-32001, message)
            block = self.chain.block(slot)
            if block is None:
                raise RpcFault(-32007, error_message(-32007, slot, first_available)[0])
            return block
        if commitment == "confirmed" and slot <= self._slot("confirmed"):
            block = self.chain.block(slot)
            if block is not None:
                return block
        raise RpcFault(-32004, error_message(-32004, slot, first_available)[0])

    def get_signature_statuses(self, params: list[Any]) -> dict[str, Any]:
        raw = _param(params, 0)
        if not isinstance(raw, list):
            raise invalid_params("invalid type: expected a sequence of signatures")
        if len(raw) > MAX_STATUS_SIGNATURES:
            raise RpcFault(-32602, f"Too many inputs provided; max {MAX_STATUS_SIGNATURES}")
        config = _config(params, 1)
        search_history = bool(config.get("searchTransactionHistory", False))
        tip_slot = self._slot("processed")
        value: list[dict[str, Any] | None] = []
        for item in raw:
            record = self.chain.transaction(_signature(item))
            if (
                record is None
                or not self._visible(record, tip_slot)
                or (not search_history and tip_slot - record.slot > STATUS_CACHE_SLOTS)
            ):
                value.append(None)
                continue
            confirmations = None
            if record.slot > self._slot("finalized"):
                confirmations = len(self.chain.produced_slots(record.slot + 1, tip_slot))
            value.append(
                {
                    "confirmationStatus": self._confirmation_status(record.slot),
                    "confirmations": confirmations,
                    "err": record.err,
                    "slot": record.slot,
                    "status": {"Ok": None} if record.err is None else {"Err": record.err},
                }
            )
        return self._context(tip_slot, value)

    def send_transaction(self, params: list[Any]) -> str:
        raw = _param(params, 0)
        config = _config(params, 1)
        if not isinstance(raw, str):
            raise invalid_params("invalid type: expected an encoded transaction string")
        encoding = config.get("encoding", "base58")
        try:
            if encoding == "base64":
                wire = base64.b64decode(raw, validate=True)
            elif encoding == "base58":
                wire = base58.b58decode(raw)
            else:
                raise invalid_params(
                    f"unsupported encoding: {encoding}. Supported encodings: base58, base64"
                )
        except ValueError:
            raise invalid_params(f"invalid {encoding} encoding") from None
        _commitment({"commitment": config.get("preflightCommitment", "finalized")})
        signature = self.chain.send(wire, skip_preflight=bool(config.get("skipPreflight", False)))
        return str(signature)

    def request_airdrop(self, params: list[Any]) -> str:
        address = _pubkey(_param(params, 0))
        lamports = _u64(_param(params, 1), "lamports")
        if lamports == 0:
            raise RpcFault(-32602, "Invalid param: lamports must be greater than zero")
        return str(self.chain.airdrop(address, lamports))


def _error(req_id: Any, fault: RpcFault) -> dict[str, Any]:
    error: dict[str, Any] = {"code": fault.code, "message": fault.message}
    if fault.data is not None:
        error["data"] = fault.data
    return {"jsonrpc": "2.0", "error": error, "id": req_id}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    rpc: SolanaRpcHandler


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one segment: without this, Nagle plus delayed ACKs
    # add ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    wbufsize = 1 << 16

    def _body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            self._reply(413, b"request too large")
            return None
        return self.rfile.read(length)

    def do_POST(self) -> None:
        body = self._body()
        if body is None:
            return
        rpc = self.server.rpc
        retry_after_s = rpc.throttled(body)
        if retry_after_s is not None:
            # What public endpoints answer when a client exceeds its rate limit.
            payload = json.dumps(
                {
                    "jsonrpc": "2.0",
                    "error": {"code": 429, "message": "Too many requests for a specific RPC call"},
                    "id": None,
                }
            ).encode()
            self._reply(429, payload, "application/json", {"Retry-After": str(retry_after_s)})
            return
        answer = rpc.handle_body(body)
        self._reply(200, json.dumps(answer).encode(), "application/json")

    def do_GET(self) -> None:
        # A node answers GET /health for load balancers.
        if self.path == "/health":
            self._reply(200, b"ok")
        elif self.path == FAULTS_PATH:
            self._faults_reply()
        else:
            self._reply(405, b"Used HTTP Method is not allowed. POST or OPTIONS is required")

    def do_PUT(self) -> None:
        """Replace the simulator's fault switches (the simulator's own control path)."""
        if self.path != FAULTS_PATH:
            self._reply(405, b"Used HTTP Method is not allowed. POST or OPTIONS is required")
            return
        body = self._body()
        if body is None:
            return
        try:
            self.server.rpc.faults.configure(json.loads(body))
        except (ValueError, FaultSpecError) as exc:
            self._reply(400, json.dumps({"error": str(exc)}).encode(), "application/json")
            return
        log.info("solana_sim_faults_set", faults=self.server.rpc.faults.to_json())
        self._faults_reply()

    def do_DELETE(self) -> None:
        if self.path != FAULTS_PATH:
            self._reply(405, b"Used HTTP Method is not allowed. POST or OPTIONS is required")
            return
        self.server.rpc.faults.clear()
        log.info("solana_sim_faults_cleared")
        self._faults_reply()

    def _faults_reply(self) -> None:
        payload = json.dumps(self.server.rpc.faults.to_json()).encode()
        self._reply(200, payload, "application/json")

    def _reply(
        self,
        status: int,
        payload: bytes,
        content_type: str = "text/plain",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("solana_sim_http", request=format % args)


class SolanaSimulator:
    """A local Solana JSON-RPC node for tests and ``escrowd devnet solana``.

    ``slot_ms=None`` advances slots only on ``advance_slots``; otherwise a clock thread
    advances one slot every ``slot_ms`` milliseconds. Helpers (``airdrop``, ``mint_to``,
    ...) go through the same path as ``sendTransaction``, so their history is visible.
    ``faults`` holds the fault switches (``devnet.solana_faults``), also reachable over
    HTTP at ``/simulator/faults``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        slot_ms: int | None = None,
        confirmed_lag_slots: int = 1,
        finalized_lag_slots: int = 32,
        skip_every_slots: int | None = 7,
        blockhash_valid_blocks: int = 150,
        first_slot: int = 0,
    ) -> None:
        assert slot_ms is None or slot_ms > 0
        self.chain = SolanaChain(
            confirmed_lag_slots=confirmed_lag_slots,
            finalized_lag_slots=finalized_lag_slots,
            skip_every_slots=skip_every_slots,
            blockhash_valid_blocks=blockhash_valid_blocks,
            first_slot=first_slot,
        )
        self.faults = SolanaFaults()
        self.rpc = SolanaRpcHandler(self.chain, self.faults)
        self.host = host
        self.port = port
        self.slot_ms = slot_ms
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the simulator first"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> SolanaSimulator:
        assert self._server is None, "already started"
        server = _Server((self.host, self.port), _RequestHandler)
        server.rpc = self.rpc
        self._server = server
        self._stopping.clear()
        # A short poll interval keeps stop() fast (shutdown waits for one poll).
        serve = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="solana-sim-http", daemon=True
        )
        serve.start()
        self._threads = [serve]
        if self.slot_ms is not None:
            clock = threading.Thread(target=self._clock, name="solana-sim-clock", daemon=True)
            clock.start()
            self._threads.append(clock)
        log.info("solana_sim_started", url=self.url, slot_ms=self.slot_ms)
        return self

    def _clock(self) -> None:
        assert self.slot_ms is not None
        while not self._stopping.wait(self.slot_ms / 1000):
            self.chain.advance_slots(1)

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> SolanaSimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- helpers (thin wrappers over the chain) ---------------------------------

    @property
    def faucet(self) -> Keypair:
        return self.chain.faucet

    @property
    def mint_authority(self) -> Keypair:
        return self.chain.mint_authority

    def airdrop(self, pubkey: Pubkey, lamports: int) -> Signature:
        return self.chain.airdrop(pubkey, lamports)

    def create_usdc_mint(self, decimals: int = 6) -> Pubkey:
        return self.chain.create_usdc_mint(decimals)

    def create_mint(self, decimals: int, mint_authority: Keypair | None = None) -> Pubkey:
        return self.chain.create_mint(decimals, mint_authority)

    def mint_to(self, mint: Pubkey, owner: Pubkey, amount_base_units: int) -> Signature:
        return self.chain.mint_to(mint, owner, amount_base_units)

    def transfer_token(
        self, sender: Keypair, mint: Pubkey, recipient: Pubkey, amount_base_units: int
    ) -> Signature:
        return self.chain.transfer_token(sender, mint, recipient, amount_base_units)

    def transfer_sol(self, sender: Keypair, to: Pubkey, lamports: int) -> Signature:
        return self.chain.transfer_sol(sender, to, lamports)

    def send_transaction(self, raw: bytes, *, skip_preflight: bool = False) -> Signature:
        return self.chain.send(raw, skip_preflight=skip_preflight)

    def latest_blockhash(self) -> Hash:
        return self.chain.tip_block().blockhash

    def advance_slots(self, n_slots: int = 1) -> int:
        return self.chain.advance_slots(n_slots)

    def finalize_all(self) -> int:
        return self.chain.finalize_all()

    def prune_history(self, below_slot: int) -> int:
        return self.chain.prune_history(below_slot)

    def drop_blocks(self, from_slot: int) -> list[Signature]:
        return self.chain.drop_blocks(from_slot)
