"""The audit details and event payloads a crediting pass writes per deposit are formatted
from templates; they must be byte for byte what `canonical_json` makes of the same fields
(stored hashes cover them, webhooks sign them). The row digest's shortcut for ASCII rows
must hash what the field-by-field form hashes."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from escrowd.escrow import events, ledger
from escrowd.escrow.audit import canonical_json, row_digest, timestamp_text
from escrowd.escrow.deposits import _event_data, _Row, _seen_details
from escrowd.indexer.sink import StoredDeposit
from escrowd.models import TransferCode

texts = st.text(max_size=40)
ids = st.integers(min_value=1, max_value=2**63 - 1)
uint256 = st.integers(min_value=0, max_value=2**256 - 1)
states = st.sampled_from(["none", "credited", "dust", "refused", "reversed", "reversal_short"])


@given(
    deposit_id=ids,
    chain=texts,
    tx_hash=texts,
    log_index=st.integers(min_value=0, max_value=2**31),
    amount=uint256,
    block_number=ids,
    status=texts,
    state=states,
    credited=uint256,
    dust=uint256,
    note=st.none() | texts,
    symbol=texts,
    decimals=st.integers(min_value=0, max_value=36),
    agent=texts,
    event_type=st.sampled_from(["deposit.pending", "deposit.confirmed", "deposit.orphaned"]),
)
def test_deposit_event_payload_is_canonical_json(
    deposit_id: int,
    chain: str,
    tx_hash: str,
    log_index: int,
    amount: int,
    block_number: int,
    status: str,
    state: str,
    credited: int,
    dust: int,
    note: str | None,
    symbol: str,
    decimals: int,
    agent: str,
    event_type: str,
) -> None:
    row = _Row(
        deposit_id, chain, tx_hash, log_index, 1, 2, amount, block_number, "0x", status, state,
        credited, dust, note,
    )  # fmt: skip
    asset: Any = SimpleNamespace(symbol=symbol, decimals=decimals)
    expected = {
        "deposit_id": deposit_id,
        "agent": agent,
        "network": chain,
        "asset": symbol,
        "decimals": decimals,
        "amount_base_units": str(amount),
        "tx_hash": tx_hash,
        "log_index": log_index,
        "block_number": block_number,
        "status": status,
        "credit_state": state,
        "credited_base_units": str(credited),
        "reversal_shortfall_base_units": str(credited if state == "reversal_short" else 0),
        "dust_base_units": str(dust),
        "credit_note": note,
    }
    data = _event_data(row, asset, agent)
    assert data == canonical_json(expected)
    assert events._payload(event_type, data) == canonical_json(
        {"type": event_type, "api_version": events.API_VERSION, "data": expected}
    )
    assert events._payload(event_type, expected) == events._payload(event_type, data)
    sighting = StoredDeposit(
        deposit_id, chain, tx_hash, log_index, 1, 2, amount, block_number, "0x", status
    )
    first = {**expected, "credit_state": "none", "credit_note": None}
    first.update(credited_base_units="0", reversal_shortfall_base_units="0", dust_base_units="0")
    assert _event_data(sighting, asset, agent) == canonical_json(first)


@given(
    deposit_id=ids,
    tx_hash=texts,
    block_hash=texts,
    log_index=st.integers(min_value=0, max_value=2**31),
    block_number=ids,
    agent_id=ids,
    amount=uint256,
    audit_amount=st.none() | uint256,
)
def test_deposit_seen_details_are_canonical_json(
    deposit_id: int,
    tx_hash: str,
    block_hash: str,
    log_index: int,
    block_number: int,
    agent_id: int,
    amount: int,
    audit_amount: int | None,
) -> None:
    seen = StoredDeposit(
        deposit_id, "base", tx_hash, log_index, 1, agent_id, amount, block_number, block_hash, "p"
    )
    expected: dict[str, Any] = {
        "deposit_id": deposit_id,
        "tx_hash": tx_hash,
        "log_index": log_index,
        "block_number": block_number,
        "block_hash": block_hash,
        "agent_id": agent_id,
    }
    if audit_amount != amount:
        expected["amount_base_units"] = str(amount)
    assert _seen_details(seen, audit_amount) == canonical_json(expected)
    # The same amount in ledger units: no base-unit amount in the details.
    expected.pop("amount_base_units", None)
    assert _seen_details(seen, amount) == canonical_json(expected)


@given(
    transfer_id=ids,
    debit=ids,
    credit=ids,
    key=texts,
    batch_id=texts,
    ref_type=texts,
    ref_id=texts,
)
def test_transfer_audit_details_are_canonical_json(
    transfer_id: int, debit: int, credit: int, key: str, batch_id: str, ref_type: str, ref_id: str
) -> None:
    spec = ledger.TransferSpec(key, debit, credit, 1, TransferCode.DEPOSIT, ref_type, ref_id)
    assert ledger._audit_details(spec, transfer_id, batch_id) == canonical_json(
        {
            "transfer_id": transfer_id,
            "debit_account_id": debit,
            "credit_account_id": credit,
            "idempotency_key": key,
            "batch_id": batch_id,
            "ref": f"{ref_type}:{ref_id}",
        }
    )


@given(
    stream=texts,
    seq=st.integers(min_value=1, max_value=2**62),
    actor=texts,
    action=texts,
    asset=st.none() | texts,
    amount=st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1),
    details=texts,
    prev_hash=texts,
)
def test_row_digest_counts_utf8_bytes(
    stream: str,
    seq: int,
    actor: str,
    action: str,
    asset: str | None,
    amount: int | None,
    details: str,
    prev_hash: str,
) -> None:
    """The digest's ASCII shortcut and its field-by-field form hash the same material:
    each field length-prefixed by its UTF-8 byte count, "~" for NULL."""
    created_at = datetime(2026, 12, 4, 12, 0, 0, 1, tzinfo=UTC)

    def netstring(value: str | int | None) -> str:
        if value is None:
            return "~"
        return f"{len(str(value).encode())}:{value}"

    fields = (stream, seq, actor, action, asset, amount, details, timestamp_text(created_at))
    material = "".join(netstring(field) for field in (*fields, prev_hash))
    assert (
        row_digest(
            stream=stream,
            seq=seq,
            actor=actor,
            action=action,
            asset=asset,
            amount=amount,
            details=details,
            created_at=created_at,
            prev_hash=prev_hash,
        )
        == hashlib.sha256(material.encode()).hexdigest()
    )
