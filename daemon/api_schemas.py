"""Request and response bodies of the HTTP API, and the value types they are built from.

Amounts travel as decimal strings in the asset's units ("12.5") next to the same value in
base units as a string of digits (``amount_base_units``), so no client parses money
through a float.

Every value a client sends is checked here, before a handler runs: bodies are strict
(``true``, ``"250"`` or ``250.0`` are not the integer 250), ids, names and addresses have
patterns without control characters (PostgreSQL text cannot hold NUL), timestamps are RFC
3339 strings with an offset. Path, query and header parameters use the same patterns
(`api_deps`). Words: a *chain family* is an address format (``evm``, ``solana``); a
*network* is one configured chain (``base``, ``ethereum``, ``solana``). One deposit
address serves every network of its family.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from escrowd.escrow.events import EVENT_TYPES

# Printable text: no C0 or C1 control characters (NUL, newlines, escapes, DEL).
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
EXTERNAL_ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"
NETWORK_PATTERN = r"^[a-z][a-z0-9_-]*$"
ASSET_PATTERN = r"^[A-Z0-9]+$"
# An EVM address (0x and 40 hex digits) or a Solana one (32 bytes in base58).
ADDRESS_PATTERN = r"^(0x[0-9A-Fa-f]{40}|[1-9A-HJ-NP-Za-km-z]{32,44})$"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
WEBHOOK_URL_PATTERN = rf"^[Hh][Tt][Tt][Pp][Ss]?://{_LABEL}(\.{_LABEL})*(:{_PORT})?([/?#][!-~]*)?$"
MAX_EXTERNAL_ID_LENGTH = 128
MAX_NETWORK_LENGTH = 32
# The marker `api.create_app` replaces with the configured values in /openapi.json: the
# networks and assets are known only at start.
CONFIGURED = "x-escrowd-configured"
NETWORK_VALUES = {CONFIGURED: "networks"}
ASSET_VALUES = {CONFIGURED: "assets"}

ExternalId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_EXTERNAL_ID_LENGTH, pattern=EXTERNAL_ID_PATTERN),
]
DecimalString = Annotated[
    str, Field(max_length=40, pattern=r"^(0|[1-9][0-9]*)(\.[0-9]+)?$", examples=["12.5"])
]
PositiveDecimalString = Annotated[
    str,
    Field(
        max_length=40,
        pattern=r"^([1-9][0-9]*(\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)$",
        examples=["12.5"],
        description="A decimal amount above zero in the asset's units, at most as many "
        "decimal places as the asset has.",
    ),
]
BaseUnits = Annotated[str, Field(pattern=r"^-?[0-9]+$")]
AssetSymbol = Annotated[
    str, Field(min_length=1, max_length=16, pattern=ASSET_PATTERN, json_schema_extra=ASSET_VALUES)
]
NetworkName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_NETWORK_LENGTH,
        pattern=NETWORK_PATTERN,
        description="A configured network (GET /v1/networks lists them), e.g. base.",
        json_schema_extra=NETWORK_VALUES,
    ),
]
ChainFamily = Literal["evm", "solana"]
EventTypeName = Annotated[
    str,
    Field(pattern=r"^[a-z*][a-z._]*$", json_schema_extra={"enum": ["*", *sorted(EVENT_TYPES)]}),
]

# RFC 3339 date-time with a mandatory offset; fractions of a second are allowed.
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _rfc3339(value: object) -> datetime:
    """A JSON string in RFC 3339 form to an aware datetime; epoch numbers and naive or
    free-form strings are refused."""
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError(
            "must be an RFC 3339 date-time string with a UTC offset, e.g. 2026-12-01T00:00:00Z"
        )
    try:
        return datetime.fromisoformat(value.upper())
    except ValueError:
        raise ValueError(f"{value!r} is not a real date and time") from None


Timestamp = Annotated[
    datetime,
    BeforeValidator(_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time", "examples": ["2026-12-01T00:00:00Z"]}),
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


class AgentCreate(_Body):
    id: ExternalId = Field(description="The marketplace's own id of the agent.")
    name: Annotated[str, Field(max_length=200, pattern=PRINTABLE_PATTERN)] | None = None


class AgentOut(BaseModel):
    id: str
    name: str | None
    created_at: datetime


class DepositAddressOut(BaseModel):
    agent_id: str
    chain_family: ChainFamily
    chain: ChainFamily = Field(
        json_schema_extra={"deprecated": True}, description="The chain family; use chain_family."
    )
    networks: list[str] = Field(
        description="The configured networks this address receives on: one EVM address "
        "receives on every EVM network. Funds sent on a network not listed are not seen."
    )
    address: str
    derivation_index: int
    token_account: str | None


class BalanceOut(BaseModel):
    asset: str
    decimals: int
    available: str = Field(description="Spendable now: escrows and withdrawals draw on it.")
    available_base_units: BaseUnits
    escrowed_as_buyer: str = Field(description="Locked in open escrows this agent funded.")
    escrowed_as_buyer_base_units: BaseUnits
    incoming: str = Field(
        description="Deposits seen on chain and not yet confirmed; available once credited."
    )
    incoming_base_units: BaseUnits
    pending_withdrawals: str = Field(
        description="Withdrawals held from the balance and not yet confirmed or failed."
    )
    pending_withdrawals_base_units: BaseUnits


class BalancesOut(BaseModel):
    agent_id: str
    balances: list[BalanceOut]


class DepositOut(BaseModel):
    id: int
    agent_id: str
    network: str
    chain: str = Field(
        json_schema_extra={"deprecated": True}, description="The network; use network."
    )
    chain_family: ChainFamily
    asset: str
    amount: str
    amount_base_units: BaseUnits
    tx_hash: str = Field(description="EVM transaction hash or Solana transaction signature.")
    log_index: int
    block_number: int = Field(description="EVM block number or Solana slot.")
    status: str
    credited: bool
    credit_state: str = Field(
        description="What happened to its credit: none, credited, dust (below one ledger "
        "unit, held on chain), refused (too large), reversed, reversal_short (a reorg took "
        "it back but the reversal fell short by reversal_shortfall_base_units)."
    )
    credited_base_units: BaseUnits = Field(
        description="Ledger units (the asset's ledger decimals) standing for this deposit."
    )
    reversal_shortfall_base_units: BaseUnits
    dust_base_units: BaseUnits = Field(
        description="Token base units below one ledger unit, held on chain, not credited."
    )
    credit_note: str | None
    created_at: datetime


class DepositPage(BaseModel):
    data: list[DepositOut]
    next_cursor: int | None = Field(description="Pass as ?cursor= for the next page.")


class EscrowCreate(_Body):
    job_id: ExternalId
    buyer: ExternalId
    worker: ExternalId
    asset: AssetSymbol
    amount: PositiveDecimalString
    fee_bps: Annotated[int, Field(ge=0, le=10_000)] | None = Field(
        default=None, description="Platform fee in basis points; defaults to the configured fee."
    )
    expires_at: Timestamp | None = Field(
        default=None,
        description="When an unsettled escrow is refunded to the buyer: an RFC 3339 "
        "date-time with an offset, in the future.",
    )


class EscrowResolve(_Body):
    worker_amount: DecimalString = Field(
        description="Part of the escrow awarded to the worker (0 to amount); the worker "
        "gets it minus the fee on it, the buyer gets the rest."
    )


class EscrowDepositOut(BaseModel):
    """The deposit an escrow was funded from (POST /v1/deposit-funded-escrows)."""

    deposit_id: int
    network: str
    tx_hash: str
    log_index: int
    depositor_address: str | None = Field(
        description="Sender of the on-chain transfer: the ERC-20 Transfer's `from` on EVM, "
        "the source owner on Solana."
    )


class EscrowOut(BaseModel):
    job_id: str
    status: Literal["funded", "released", "refunded", "resolved", "expired"]
    buyer: str
    worker: str
    asset: str
    amount: str
    amount_base_units: BaseUnits
    fee_bps: int
    worker_amount: str | None
    worker_amount_base_units: BaseUnits | None
    fee_amount: str | None
    fee_amount_base_units: BaseUnits | None
    refund_amount: str | None
    refund_amount_base_units: BaseUnits | None
    expires_at: datetime | None
    resolved_at: datetime | None
    created_at: datetime
    funded_from_deposit: EscrowDepositOut | None = Field(
        default=None, description="Null for an escrow funded from the buyer's balance."
    )


class WithdrawalCreate(_Body):
    # Exactly one of network and its old name chain.
    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["network"]}, {"required": ["chain"]}]}
    )

    agent_id: ExternalId
    asset: AssetSymbol
    network: NetworkName | SkipJsonSchema[None] = Field(
        default=None, description="The network to pay out on."
    )
    chain: NetworkName | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra={"deprecated": True},
        description="The old name of `network`; send one of them.",
    )
    to_address: Annotated[
        str,
        Field(
            min_length=1,
            max_length=64,
            pattern=ADDRESS_PATTERN,
            description="An address of the network's chain family: EVM 0x-hex (EIP-55 "
            "checksummed if mixed case), Solana base58.",
        ),
    ]
    amount: PositiveDecimalString

    @model_validator(mode="after")
    def _one_network(self) -> WithdrawalCreate:
        if self.network is None and self.chain is None:
            raise ValueError("network is required, e.g. base")
        if self.network is not None and self.chain is not None:
            raise ValueError("send network only: chain is its old name")
        return self

    @property
    def network_name(self) -> str:
        name = self.network or self.chain
        assert name is not None, "checked by _one_network"
        return name


class WithdrawalOut(BaseModel):
    id: int = Field(description="The payout id that payout.* webhook events carry.")
    agent_id: str
    network: str
    chain: str = Field(
        json_schema_extra={"deprecated": True}, description="The network; use network."
    )
    chain_family: ChainFamily
    asset: str
    destination: str
    amount: str
    amount_base_units: BaseUnits
    status: str = Field(
        description="requested (held, not yet signed), signed, broadcast, confirmed or failed."
    )
    reason: str = Field(description="withdrawal, or release/refund for an escrow payout.")
    tx_hash: str | None = Field(
        description="EVM transaction hash or Solana signature, once signed; after a "
        "re-sign it is the newest."
    )
    block_number: int | None = Field(
        description="EVM block or Solana slot the transaction landed in, once known."
    )
    confirmations: int | None = Field(
        description="EVM: blocks from the including block to the newest block escrowd's "
        "poller scanned, counting the including one. Solana (confirmed means finalized) "
        "and payouts not yet in a block: null."
    )
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    broadcast_at: datetime | None
    confirmed_at: datetime | None


class WithdrawalPage(BaseModel):
    data: list[WithdrawalOut]
    next_cursor: int | None = Field(description="Pass as ?cursor= for the next page.")


class NetworkAsset(BaseModel):
    asset: str
    decimals: int
    token_address: str | None = Field(description="ERC-20 contract or SPL mint; null if native.")


class NetworkOut(BaseModel):
    network: str
    chain_family: ChainFamily
    chain_id: int | None = Field(description="EVM chain id; null on Solana.")
    confirmations: int | None = Field(
        description="EVM blocks a deposit needs before it is credited; Solana waits for "
        "finalized (null)."
    )
    assets: list[NetworkAsset]


class AuditRowOut(BaseModel):
    id: int
    stream: str
    seq: int
    actor: str
    action: str
    asset: str | None
    amount_base_units: BaseUnits | None
    details: dict[str, Any]
    created_at: datetime
    row_hash: str


class AuditPage(BaseModel):
    data: list[AuditRowOut]
    next_cursor: int | None


class AuditVerifyOut(BaseModel):
    ok: bool
    rows_checked: int
    streams_checked: int
    first_problem: str | None


class WebhookEndpointCreate(_Body):
    url: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2000,
            pattern=WEBHOOK_URL_PATTERN,
            description="http:// or https://, a host name or IPv4 address, an optional "
            "port and path; visible ASCII only (percent-encode the rest).",
        ),
    ]
    event_types: Annotated[
        list[EventTypeName], Field(min_length=1, max_length=len(EVENT_TYPES) + 1)
    ] = Field(default=["*"], description='Event types to receive; "*" for all.')


class WebhookEndpointOut(BaseModel):
    id: int
    url: str
    event_types: list[str]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str | None = Field(
        description="The signing secret, returned once: whsec_ and base64, usable as is "
        "with Standard Webhooks libraries. An idempotent replay of the same request "
        "returns null here: the secret is never stored in plain text."
    )


class WebhookSecretOut(BaseModel):
    endpoint_id: int
    secret: str | None = Field(description="The new signing secret (null on a replay).")


class DeliveryOut(BaseModel):
    id: int
    endpoint_id: int
    event_id: int
    status: str
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    created_at: datetime


class DeliveryPage(BaseModel):
    data: list[DeliveryOut]
    next_cursor: int | None
