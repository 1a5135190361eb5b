"""The local Solana JSON-RPC simulator, driven by the real solana client and raw httpx."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from typing import Any

import base58
import httpx
import pytest
from solana.rpc.async_api import AsyncClient
from solana.rpc.core import RPCException
from solana.rpc.models import TokenAccountOpts, TxOpts
from solders.account import Account
from solders.address_lookup_table_account import AddressLookupTableAccount
from solders.keypair import Keypair
from solders.message import Message, MessageV0
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import get_associated_token_address

from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.indexer.solana_source import SolanaRpcSource

# One client for the module: building an httpx client per call costs ~70 ms.
HTTP = httpx.Client(timeout=10)


@pytest.fixture
def sim() -> Iterator[SolanaSimulator]:
    with SolanaSimulator(skip_every_slots=7) as simulator:
        yield simulator


def rpc(sim: SolanaSimulator, method: str, params: list[Any] | None = None) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}
    response = HTTP.post(sim.url, json=body)
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def client_call(sim: SolanaSimulator, fn: Any) -> Any:
    async def go() -> Any:
        async with AsyncClient(sim.url) as client:
            return await fn(client)

    return asyncio.run(go())


def signed_transfer(sender: Keypair, to: Pubkey, lamports: int, blockhash: Any) -> bytes:
    ix = transfer(TransferParams(from_pubkey=sender.pubkey(), to_pubkey=to, lamports=lamports))
    message = Message.new_with_blockhash([ix], sender.pubkey(), blockhash)
    return bytes(VersionedTransaction(message, [sender]))


def test_node_info_methods_answer_like_a_node(sim: SolanaSimulator) -> None:
    sim.advance_slots(39)  # the tip starts at slot 1
    assert rpc(sim, "getHealth")["result"] == "ok"
    version = rpc(sim, "getVersion")["result"]
    assert set(version) == {"solana-core", "feature-set"}
    assert rpc(sim, "getSlot", [{"commitment": "processed"}])["result"] == 40
    assert rpc(sim, "getSlot", [{"commitment": "confirmed"}])["result"] == 39
    # finalized = highest block at or below tip - 32 = 8, but 7 is skipped, 8 is not
    assert rpc(sim, "getSlot")["result"] == 8
    # 40 slots, 5 of them skipped (7, 14, ..., 35): 35 blocks after genesis
    assert rpc(sim, "getBlockHeight", [{"commitment": "processed"}])["result"] == 35
    latest = client_call(sim, lambda c: c.get_latest_blockhash("processed"))
    assert latest.context.slot == 40
    assert latest.value.last_valid_block_height == 35 + 150
    assert rpc(sim, "getMinimumBalanceForRentExemption", [165])["result"] == 2039280
    rent = client_call(sim, lambda c: c.get_minimum_balance_for_rent_exemption(82))
    assert rent.value == 1461600


def test_airdrop_and_balances_respect_commitment(sim: SolanaSimulator) -> None:
    wallet = Keypair().pubkey()
    sig = client_call(sim, lambda c: c.request_airdrop(wallet, 2_000_000_000)).value
    processed = client_call(sim, lambda c: c.get_balance(wallet, "processed"))
    assert processed.value == 2_000_000_000
    assert client_call(sim, lambda c: c.get_balance(wallet, "confirmed")).value == 0
    assert client_call(sim, lambda c: c.get_transaction(sig, commitment="confirmed")).value is None
    statuses = client_call(sim, lambda c: c.get_signature_statuses([sig])).value
    assert str(statuses[0].confirmation_status) == "TransactionConfirmationStatus.Processed"

    sim.advance_slots(1)
    assert client_call(sim, lambda c: c.get_balance(wallet, "confirmed")).value == 2_000_000_000
    assert client_call(sim, lambda c: c.get_balance(wallet)).value == 0
    tx = client_call(sim, lambda c: c.get_transaction(sig, commitment="confirmed")).value
    assert tx is not None and tx.transaction.meta.post_balances[1] == 2_000_000_000
    assert client_call(sim, lambda c: c.get_transaction(sig)).value is None

    sim.finalize_all()
    assert client_call(sim, lambda c: c.get_balance(wallet)).value == 2_000_000_000
    final = client_call(sim, lambda c: c.get_signature_statuses([sig], True)).value[0]
    assert str(final.confirmation_status) == "TransactionConfirmationStatus.Finalized"
    assert final.confirmations is None

    answer = rpc(sim, "getTransaction", [str(sig), {"commitment": "processed"}])
    assert answer["error"]["code"] == -32602
    assert "commitment below `confirmed`" in answer["error"]["message"]


def test_send_transaction_base64_base58_and_preflight_errors(sim: SolanaSimulator) -> None:
    payer = Keypair()
    sim.airdrop(payer.pubkey(), 10**9)
    blockhash = sim.latest_blockhash()
    receiver = Keypair().pubkey()

    raw = signed_transfer(payer, receiver, 5_000_000, blockhash)
    sig = client_call(sim, lambda c: c.send_raw_transaction(raw)).value
    assert sim.chain.transaction(sig) is not None
    raw58 = signed_transfer(payer, receiver, 6_000_000, blockhash)
    answer = rpc(sim, "sendTransaction", [base58.b58encode(raw58).decode()])
    assert answer["result"] == str(VersionedTransaction.from_bytes(raw58).signatures[0])
    assert (
        rpc(sim, "getBalance", [str(receiver), {"commitment": "processed"}])["result"]["value"]
        == 11_000_000
    )

    # Preflight failure: the node's -32002 with err and logs; nothing lands.
    too_much = signed_transfer(payer, receiver, 10**12, blockhash)
    answer = rpc(
        sim, "sendTransaction", [base64.b64encode(too_much).decode(), {"encoding": "base64"}]
    )
    error = answer["error"]
    assert error["code"] == -32002
    assert error["message"] == (
        "Transaction simulation failed: Error processing Instruction 0: custom program error: 0x1"
    )
    assert error["data"]["err"] == {"InstructionError": [0, {"Custom": 1}]}
    assert any("insufficient lamports" in line for line in error["data"]["logs"])
    with pytest.raises(RPCException):
        client_call(sim, lambda c: c.send_raw_transaction(too_much))

    # The same bytes again are a duplicate.
    dup = rpc(sim, "sendTransaction", [base64.b64encode(raw).decode(), {"encoding": "base64"}])
    assert dup["error"]["data"]["err"] == "AlreadyProcessed"

    # skipPreflight: the failing transaction lands with meta.err and pays only its fee.
    before = sim.chain.svm.get_balance(payer.pubkey())
    failed_sig = client_call(
        sim, lambda c: c.send_raw_transaction(too_much, TxOpts(skip_preflight=True))
    ).value
    sim.advance_slots(1)
    tx = rpc(sim, "getTransaction", [str(failed_sig), {"commitment": "confirmed"}])["result"]
    assert tx["meta"]["err"] == {"InstructionError": [0, {"Custom": 1}]}
    assert tx["meta"]["status"] == {"Err": {"InstructionError": [0, {"Custom": 1}]}}
    assert tx["meta"]["preBalances"][0] - tx["meta"]["postBalances"][0] == tx["meta"]["fee"] == 5000
    assert tx["meta"]["preBalances"][1] == tx["meta"]["postBalances"][1]
    assert sim.chain.svm.get_balance(payer.pubkey()) == before - 5000
    sigs = rpc(sim, "getSignaturesForAddress", [str(payer.pubkey()), {"commitment": "confirmed"}])
    assert sigs["result"][0]["signature"] == str(failed_sig)
    assert sigs["result"][0]["err"] == {"InstructionError": [0, {"Custom": 1}]}

    bad = rpc(sim, "sendTransaction", ["not base64!", {"encoding": "base64"}])
    assert bad["error"]["code"] == -32602


def test_expired_blockhash_is_rejected() -> None:
    with SolanaSimulator(blockhash_valid_blocks=10, skip_every_slots=None) as sim:
        payer = Keypair()
        sim.airdrop(payer.pubkey(), 10**9)
        old = sim.latest_blockhash()
        valid = rpc(sim, "isBlockhashValid", [str(old), {"commitment": "processed"}])
        assert valid["result"]["value"] is True
        sim.advance_slots(11)
        valid = rpc(sim, "isBlockhashValid", [str(old), {"commitment": "processed"}])
        assert valid["result"]["value"] is False
        raw = signed_transfer(payer, Keypair().pubkey(), 1_000_000, old)
        answer = rpc(
            sim, "sendTransaction", [base64.b64encode(raw).decode(), {"encoding": "base64"}]
        )
        assert answer["error"]["code"] == -32002
        assert answer["error"]["message"] == "Transaction simulation failed: Blockhash not found"
        assert answer["error"]["data"]["err"] == "BlockhashNotFound"
        # skipPreflight returns the signature, but the transaction never lands.
        skipped = rpc(
            sim,
            "sendTransaction",
            [base64.b64encode(raw).decode(), {"encoding": "base64", "skipPreflight": True}],
        )
        statuses = rpc(
            sim, "getSignatureStatuses", [[skipped["result"]], {"searchTransactionHistory": True}]
        )
        assert statuses["result"]["value"] == [None]
        fresh = signed_transfer(payer, Keypair().pubkey(), 1_000_000, sim.latest_blockhash())
        ok = rpc(sim, "sendTransaction", [base64.b64encode(fresh).decode(), {"encoding": "base64"}])
        assert "result" in ok


def test_spl_transfer_token_balances_and_owner_not_indexed(sim: SolanaSimulator) -> None:
    alice, bob = Keypair(), Keypair()
    sim.airdrop(alice.pubkey(), 10**9)
    usdc = sim.create_usdc_mint()
    fake_usdc = sim.create_mint(6)
    sim.mint_to(usdc, alice.pubkey(), 5_000_000)
    sim.mint_to(fake_usdc, bob.pubkey(), 7)
    transfer_sig = sim.transfer_token(alice, usdc, bob.pubkey(), 1_250_000)
    sim.finalize_all()
    bob_ata = get_associated_token_address(bob.pubkey(), usdc)
    alice_ata = get_associated_token_address(alice.pubkey(), usdc)

    tx = client_call(
        sim, lambda c: c.get_transaction(transfer_sig, max_supported_transaction_version=0)
    ).value
    keys = [str(k) for k in tx.transaction.transaction.message.account_keys]
    assert str(bob.pubkey()) not in keys
    meta = tx.transaction.meta
    post = {(str(b.owner), str(b.mint)): b.ui_token_amount.amount for b in meta.post_token_balances}
    pre = {(str(b.owner), str(b.mint)): b.ui_token_amount.amount for b in meta.pre_token_balances}
    assert pre[(str(bob.pubkey()), str(usdc))] == "0"
    assert post[(str(bob.pubkey()), str(usdc))] == "1250000"
    assert post[(str(alice.pubkey()), str(usdc))] == "3750000"
    entry = next(b for b in meta.post_token_balances if str(b.owner) == str(bob.pubkey()))
    assert keys[entry.account_index] == str(bob_ata)
    assert entry.ui_token_amount.ui_amount_string == "1.25"
    assert str(entry.program_id) == str(TOKEN_PROGRAM_ID)
    assert (
        rpc(sim, "getTransaction", [str(transfer_sig), {"maxSupportedTransactionVersion": 0}])[
            "result"
        ]["version"]
        == "legacy"
    )

    parsed = rpc(sim, "getTransaction", [str(transfer_sig), {"encoding": "jsonParsed"}])["result"]
    ix = parsed["transaction"]["message"]["instructions"][0]
    assert ix["program"] == "spl-token" and ix["parsed"]["type"] == "transferChecked"
    assert ix["parsed"]["info"]["destination"] == str(bob_ata)
    assert ix["parsed"]["info"]["tokenAmount"]["amount"] == "1250000"
    assert "version" not in parsed
    assert (
        parsed["meta"]["postTokenBalances"]
        == rpc(sim, "getTransaction", [str(transfer_sig), {"encoding": "json"}])["result"]["meta"][
            "postTokenBalances"
        ]
    )

    # A node indexes listed account keys only: the token account, not its owner wallet.
    by_wallet = client_call(sim, lambda c: c.get_signatures_for_address(bob.pubkey())).value
    by_ata = client_call(sim, lambda c: c.get_signatures_for_address(bob_ata)).value
    assert transfer_sig not in [s.signature for s in by_wallet]
    assert by_ata[0].signature == transfer_sig
    assert transfer_sig in [
        s.signature
        for s in client_call(sim, lambda c: c.get_signatures_for_address(alice.pubkey())).value
    ]

    by_mint = client_call(
        sim,
        lambda c: c.get_token_accounts_by_owner_json_parsed(
            bob.pubkey(), TokenAccountOpts(mint=usdc)
        ),
    ).value
    assert [str(a.pubkey) for a in by_mint] == [str(bob_ata)]
    by_program = client_call(
        sim,
        lambda c: c.get_token_accounts_by_owner(
            bob.pubkey(), TokenAccountOpts(program_id=TOKEN_PROGRAM_ID)
        ),
    ).value
    assert len(by_program) == 2
    balance = client_call(sim, lambda c: c.get_token_account_balance(bob_ata)).value
    assert balance.amount == "1250000" and balance.decimals == 6
    info = rpc(sim, "getAccountInfo", [str(alice_ata), {"encoding": "jsonParsed"}])["result"]
    assert info["value"]["data"]["parsed"]["info"]["tokenAmount"]["amount"] == "3750000"
    assert info["value"]["data"]["parsed"]["info"]["owner"] == str(alice.pubkey())
    raw_info = client_call(sim, lambda c: c.get_account_info(usdc, encoding="base64")).value
    assert raw_info.owner == TOKEN_PROGRAM_ID and len(raw_info.data) == 82
    missing = rpc(sim, "getAccountInfo", [str(Keypair().pubkey()), {"encoding": "base64"}])
    assert missing["result"]["value"] is None
    not_token = rpc(sim, "getTokenAccountBalance", [str(alice.pubkey())])
    assert not_token["error"] == {"code": -32602, "message": "Invalid param: not a Token account"}


def test_signature_paging_before_until_limit(sim: SolanaSimulator) -> None:
    wallet = Keypair().pubkey()
    sigs = []
    for i in range(5):
        sigs.append(sim.airdrop(wallet, 1_000_000 + i))
        sim.advance_slots(1)
    sim.finalize_all()
    newest_first = [str(s) for s in reversed(sigs)]
    page = rpc(sim, "getSignaturesForAddress", [str(wallet), {"limit": 2}])["result"]
    assert [p["signature"] for p in page] == newest_first[:2]
    assert all(p["confirmationStatus"] == "finalized" and p["err"] is None for p in page)
    assert page[0]["slot"] > page[1]["slot"] and isinstance(page[0]["blockTime"], int)
    rest = rpc(sim, "getSignaturesForAddress", [str(wallet), {"before": page[-1]["signature"]}])
    assert [p["signature"] for p in rest["result"]] == newest_first[2:]
    until = rpc(sim, "getSignaturesForAddress", [str(wallet), {"until": newest_first[3]}])
    assert [p["signature"] for p in until["result"]] == newest_first[:3]
    too_many = rpc(sim, "getSignaturesForAddress", [str(wallet), {"limit": 1001}])
    assert too_many["error"]["code"] == -32602


def test_blocks_skipped_slots_and_availability(sim: SolanaSimulator) -> None:
    wallet = Keypair().pubkey()
    sim.advance_slots(4)
    sig = sim.airdrop(wallet, 10**9)  # lands in slot 5
    sim.advance_slots(60)  # tip 65, finalized 33
    blocks = client_call(sim, lambda c: c.get_blocks(0, 20)).value
    assert blocks == [s for s in range(21) if s == 0 or s % 7 != 0]

    skipped = rpc(sim, "getBlock", [14])["error"]
    assert skipped == {
        "code": -32007,
        "message": "Slot 14 was skipped, or missing due to ledger jump to recent snapshot",
    }
    future = rpc(sim, "getBlock", [50])["error"]  # exists at processed, not finalized
    assert future == {"code": -32004, "message": "Block not available for slot 50"}
    with pytest.raises(RPCException):
        client_call(sim, lambda c: c.get_block(14))

    block = client_call(sim, lambda c: c.get_block(5, max_supported_transaction_version=0)).value
    assert [t.transaction.signatures[0] for t in block.transactions] == [sig]
    assert block.parent_slot == 4 and block.block_height == 5
    parent = rpc(sim, "getBlock", [4, {"transactionDetails": "none"}])["result"]
    assert "transactions" not in parent and "signatures" not in parent
    assert str(block.previous_blockhash) == parent["blockhash"]
    after_skip = rpc(sim, "getBlock", [8, {"transactionDetails": "signatures"}])["result"]
    assert after_skip["parentSlot"] == 6 and after_skip["signatures"] == []
    confirmed = rpc(sim, "getBlock", [64, {"commitment": "confirmed"}])["result"]
    assert confirmed["parentSlot"] == 62  # 63 is skipped
    processed = rpc(sim, "getBlock", [65, {"commitment": "processed"}])["error"]
    assert processed["code"] == -32602


def test_protocol_errors_never_crash(sim: SolanaSimulator) -> None:
    assert rpc(sim, "getNope")["error"] == {"code": -32601, "message": "Method not found"}
    bad = rpc(sim, "getBalance", [12])["error"]
    assert bad["code"] == -32602 and bad["message"].startswith("Invalid params:")
    assert rpc(sim, "getBalance", ["notakey"])["error"]["code"] == -32602
    assert rpc(sim, "getSlot", [{"commitment": "sometime"}])["error"]["code"] == -32602
    malformed = HTTP.post(sim.url, content=b'{"jsonrpc": "2.0", "id"', timeout=5)
    assert malformed.status_code == 200
    assert malformed.json()["error"] == {"code": -32700, "message": "Parse error"}
    batch = HTTP.post(
        sim.url,
        json=[
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "getSlot",
                "params": [{"commitment": "processed"}],
            },
            {"jsonrpc": "2.0", "id": 2, "method": "getNope"},
            {"jsonrpc": "2.0", "id": 3, "method": "getHealth"},
        ],
        timeout=5,
    ).json()
    assert [item["id"] for item in batch] == [1, 2, 3]
    assert batch[0]["result"] == 1 and batch[1]["error"]["code"] == -32601
    assert batch[2]["result"] == "ok"
    empty = HTTP.post(sim.url, json=[], timeout=5).json()
    assert empty["error"]["code"] == -32600
    assert HTTP.post(sim.url, json={"id": 1}, timeout=5).json()["error"]["code"] == -32600
    assert rpc(sim, "getHealth")["result"] == "ok"


def test_clock_advances_slots() -> None:
    with SolanaSimulator(slot_ms=20) as sim:
        deadline = time.monotonic() + 5
        while rpc(sim, "getSlot", [{"commitment": "processed"}])["result"] < 10:
            assert time.monotonic() < deadline, "clock did not advance"
            time.sleep(0.02)


ALT_PROGRAM_ID = Pubkey.from_string("AddressLookupTab1e1111111111111111111111111")


def lookup_table_account(addresses: list[Pubkey]) -> Account:
    """An active, frozen address lookup table (56-byte header, then the addresses)."""
    header = (1).to_bytes(4, "little") + (2**64 - 1).to_bytes(8, "little") + bytes(10)
    data = header.ljust(56, b"\0") + b"".join(bytes(a) for a in addresses)
    return Account(lamports=10**7, data=data, owner=ALT_PROGRAM_ID)


def test_v0_transaction_with_lookup_table(sim: SolanaSimulator) -> None:
    payer, table = Keypair(), Keypair().pubkey()
    dest = Keypair().pubkey()
    sim.airdrop(payer.pubkey(), 10**9)
    sim.airdrop(dest, 10**9)
    sim.chain.svm.set_account(table, lookup_table_account([dest]))
    sim.advance_slots(1)
    ix = transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=dest, lamports=12345))
    lookup = AddressLookupTableAccount(table, [dest])
    message = MessageV0.try_compile(payer.pubkey(), [ix], [lookup], sim.latest_blockhash())
    assert dest not in message.account_keys
    raw = bytes(VersionedTransaction(message, [payer]))
    sig = rpc(sim, "sendTransaction", [base64.b64encode(raw).decode(), {"encoding": "base64"}])
    sim.finalize_all()

    legacy_client = rpc(sim, "getTransaction", [sig["result"]])["error"]
    assert legacy_client["code"] == -32015
    tx = rpc(sim, "getTransaction", [sig["result"], {"maxSupportedTransactionVersion": 0}])
    result = tx["result"]
    assert result["version"] == 0
    assert result["meta"]["loadedAddresses"] == {"writable": [str(dest)], "readonly": []}
    dest_index = len(result["transaction"]["message"]["accountKeys"])
    meta = result["meta"]
    assert meta["postBalances"][dest_index] - meta["preBalances"][dest_index] == 12345
    # A node indexes loaded addresses too.
    sigs = rpc(sim, "getSignaturesForAddress", [str(dest), {"limit": 1}])["result"]
    assert sigs[0]["signature"] == sig["result"]
    block = rpc(
        sim,
        "getBlock",
        [result["slot"], {"transactionDetails": "accounts", "maxSupportedTransactionVersion": 0}],
    )["result"]
    keys = block["transactions"][0]["transaction"]["accountKeys"]
    assert {"pubkey": str(dest), "signer": False, "source": "lookupTable", "writable": True} in keys
    assert "logMessages" not in block["transactions"][0]["meta"]
    with SolanaRpcSource([sim.url]) as source:
        typed = source.get_transaction(sig["result"])
    assert typed is not None and typed.account_keys[dest_index] == str(dest)
    assert typed.post_balances[dest_index] - typed.pre_balances[dest_index] == 12345


def test_block_errors_follow_finality_and_pruned_history() -> None:
    """What an Agave node answers for a slot: a skip is known only once finalized
    (-32004 above, -32007 below), pruned history is -32001 and gone from every method."""
    with SolanaSimulator(first_slot=400_000_000, skip_every_slots=7) as sim:
        wallet = Keypair().pubkey()
        old = sim.airdrop(wallet, 10**9)
        sim.advance_slots(60)
        skipped = next(s for s in range(400_000_002, 400_000_040) if sim.chain.is_skipped(s))
        finalized = sim.chain.commitment_slot("finalized")
        later_skip = next(
            s for s in range(finalized + 1, finalized + 40) if sim.chain.is_skipped(s)
        )
        above = rpc(sim, "getBlock", [later_skip, {"commitment": "confirmed"}])["error"]
        assert above == {"code": -32004, "message": f"Block not available for slot {later_skip}"}
        assert rpc(sim, "getBlock", [skipped])["error"]["code"] == -32007
        assert rpc(sim, "getFirstAvailableBlock")["result"] == 400_000_000
        # No end slot: the range is capped (500,000 slots), so from 0 nothing is listed;
        # with an end slot, a longer range is refused.
        assert rpc(sim, "getBlocks", [0])["result"] == []
        too_long = rpc(sim, "getBlocks", [0, 400_000_010])["error"]
        assert too_long == {"code": -32602, "message": "Slot range too large; max 500000"}
        assert rpc(sim, "getBlocks", [400_000_000])["result"][:2] == [400_000_000, 400_000_001]
        limited = rpc(sim, "getBlocksWithLimit", [400_000_005, 3])["result"]
        assert limited == sim.chain.produced_slots(400_000_005, finalized)[:3]
        assert rpc(sim, "getBlocksWithLimit", [0, 500_001])["error"]["code"] == -32602

        first = sim.prune_history(400_000_010)
        assert rpc(sim, "getFirstAvailableBlock")["result"] == first
        cleaned = rpc(sim, "getBlock", [400_000_003])["error"]
        assert cleaned == {
            "code": -32001,
            "message": "Block 400000003 cleaned up, does not exist on node. "
            f"First available block: {first}",
        }
        assert rpc(sim, "getBlocks", [400_000_000, 400_000_020])["result"][0] == first
        assert rpc(sim, "getTransaction", [str(old)])["result"] is None
        assert rpc(sim, "getSignaturesForAddress", [str(wallet)])["result"] == []
        statuses = rpc(
            sim, "getSignatureStatuses", [[str(old)], {"searchTransactionHistory": True}]
        )
        assert statuses["result"]["value"] == [None]


def test_ata_creation_inner_instructions_and_zero_ui_amount(sim: SolanaSimulator) -> None:
    usdc = sim.create_usdc_mint()
    owner = Keypair().pubkey()
    mint_sig = sim.mint_to(usdc, owner, 5)  # creates the ATA first, in its own transaction
    sim.advance_slots(1)
    create_sig = sim.chain.signatures_for(get_associated_token_address(owner, usdc))[0].signature
    answer = rpc(sim, "getTransaction", [str(create_sig), {"commitment": "confirmed"}])["result"]
    inner = answer["meta"]["innerInstructions"]
    keys = answer["transaction"]["message"]["accountKeys"]
    assert [entry["index"] for entry in inner] == [0]
    # The ATA program's CPIs: token program (size), system createAccount, token init.
    programs = [keys[ix["programIdIndex"]] for ix in inner[0]["instructions"]]
    assert "11111111111111111111111111111111" in programs
    assert programs.count(str(TOKEN_PROGRAM_ID)) >= 2
    assert {ix["stackHeight"] for ix in inner[0]["instructions"]} == {2}
    parsed = rpc(
        sim,
        "getTransaction",
        [str(create_sig), {"commitment": "confirmed", "encoding": "jsonParsed"}],
    )["result"]
    created = [
        ix["parsed"]
        for ix in parsed["meta"]["innerInstructions"][0]["instructions"]
        if ix.get("program") == "system"
    ]
    assert created[0]["type"] == "createAccount"
    assert created[0]["info"]["newAccount"] == str(get_associated_token_address(owner, usdc))
    # A transaction's stored token balances answer a zero uiAmount as null (the node's
    # ledger encoding); account data answers 0.0.
    minted = rpc(sim, "getTransaction", [str(mint_sig), {"commitment": "confirmed"}])["result"]
    before = minted["meta"]["preTokenBalances"][0]["uiTokenAmount"]
    assert before == {"amount": "0", "decimals": 6, "uiAmount": None, "uiAmountString": "0"}
    after = minted["meta"]["postTokenBalances"][0]["uiTokenAmount"]
    assert after["uiAmount"] == 0.000005 and after["uiAmountString"] == "0.000005"
    empty = get_associated_token_address(Keypair().pubkey(), usdc)
    assert rpc(sim, "getTokenAccountBalance", [str(empty)])["error"]["code"] == -32602


def test_replica_lag_min_context_slot_and_account_history(sim: SolanaSimulator) -> None:
    wallet = Keypair().pubkey()
    sim.advance_slots(5)
    sim.airdrop(wallet, 7 * 10**9)
    sim.advance_slots(3)
    landed = sim.airdrop(wallet, 11 * 10**9)
    sim.advance_slots(2)
    confirmed = sim.chain.commitment_slot("confirmed")
    accounts = rpc(
        sim,
        "getMultipleAccounts",
        [[str(wallet), str(Keypair().pubkey())], {"commitment": "confirmed", "encoding": "base64"}],
    )["result"]
    assert accounts["context"]["slot"] == confirmed
    assert accounts["value"][0]["lamports"] == 18 * 10**9 and accounts["value"][1] is None
    refused = rpc(sim, "getSlot", [{"commitment": "confirmed", "minContextSlot": confirmed + 1}])
    assert refused["error"] == {
        "code": -32016,
        "message": "Minimum context slot has not been reached",
        "data": {"contextSlot": confirmed},
    }
    sim.faults.set_lag(4)
    assert rpc(sim, "getSlot", [{"commitment": "confirmed"}])["result"] < confirmed
    # The replica has not seen the second airdrop yet: its state and history say so.
    behind = rpc(sim, "getMultipleAccounts", [[str(wallet)], {"commitment": "confirmed"}])
    assert behind["result"]["value"][0]["lamports"] == 7 * 10**9
    assert rpc(sim, "getTransaction", [str(landed), {"commitment": "confirmed"}])["result"] is None
    sim.faults.set_lag(4, alternate=True)
    answers = [rpc(sim, "getSlot", [{"commitment": "confirmed"}])["result"] for _ in range(4)]
    assert len(set(answers)) == 2  # a load balancer between two replicas
    sim.faults.clear()


def test_fault_switches_over_http(sim: SolanaSimulator) -> None:
    url = sim.url + "/simulator/faults"
    spec = {
        "lag_slots": 2,
        "rules": [
            {"kind": "http_429", "methods": ["getSlot"], "count": 1, "retry_after_s": 3},
            {"kind": "error", "methods": ["getBlock"], "code": -32009, "count": 1},
        ],
    }
    put = HTTP.put(url, json=spec)
    assert put.status_code == 200 and put.json()["lag_slots"] == 2
    throttled = HTTP.post(sim.url, json={"jsonrpc": "2.0", "id": 1, "method": "getSlot"})
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "3"
    assert rpc(sim, "getSlot")["result"] == 0
    assert rpc(sim, "getBlock", [0])["error"]["code"] == -32009
    state = HTTP.get(url).json()
    assert state["rules"] == [] and state["injected"]["http_429"] == 1
    bad = HTTP.put(url, json={"rules": [{"kind": "error", "code": -1}]})
    assert bad.status_code == 400 and "code among" in bad.json()["error"]
    assert HTTP.get(url).json()["lag_slots"] == 2  # a refused change changes nothing
    assert HTTP.delete(url).json()["lag_slots"] == 0


def test_blocks_as_large_as_mainnets_are_served() -> None:
    with SolanaSimulator(skip_every_slots=None, finalized_lag_slots=1) as sim:
        sim.chain.add_filler_transactions(1_500)
        wallet = Keypair().pubkey()
        sig = sim.airdrop(wallet, 10**9)
        sim.finalize_all()
        with SolanaRpcSource([sim.url], timeout_s=30) as source:
            slot = source.get_signatures_for_address(str(wallet))[0].slot
            block = source.get_block(slot, transaction_details="accounts")
        assert len(block.transactions) >= 1_500
        assert str(sig) in [tx.signature for tx in block.transactions]
