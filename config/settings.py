"""One typed settings object: a TOML file overridden by ESCROWD_* environment variables.

Precedence (highest first): ESCROWD_* environment variables, the TOML file named by
``--config`` or ``ESCROWD_CONFIG``, built-in defaults. Nested keys use a double
underscore in the environment: ``ESCROWD_API__PORT=8080`` sets ``[api] port``.
Unknown keys in the file, wrong types and impossible values fail at start with the key
named. An ``ESCROWD_*`` variable that names no setting is logged as a warning
(``unknown_environment_variable``) and ignored: the environment is shared with other
programs, and an unrelated variable must not stop every command.
"""

from __future__ import annotations

import json
import os
import tomllib
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from escrowd.config.errors import ValidationFailed
from escrowd.config.rate_limit import parse_limit

log = structlog.get_logger(__name__)

ENV_PREFIX = "ESCROWD_"
CONFIG_ENV = "ESCROWD_CONFIG"
# ESCROWD_* variables that are inputs of their own, not settings overrides.
NOT_SETTINGS = frozenset({CONFIG_ENV, "ESCROWD_KEYSTORE_PASSPHRASE", "ESCROWD_ANVIL"})

NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
# Paths arrive as TOML/env strings; strict mode would refuse the str -> Path conversion.
PathValue = Annotated[Path, Field(strict=False)]


class SettingsError(Exception):
    """The configuration cannot be used; the message names the key and what to fix."""


# The ledger keeps each asset at one scale, whatever decimals its token has on a chain:
# deposits are converted into it and payouts out of it exactly (models.registry). A chain
# whose token is coarser than this could not pay every ledger amount, so it is refused.
LEDGER_DECIMALS = {"USDC": 6, "SOL": 9}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def default_data_dir() -> Path:
    # systemd's StateDirectory= exports STATE_DIRECTORY; honour it so the unit needs no path.
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "escrowd"


class KeystoreSettings(_Section):
    path: PathValue | None = None
    passphrase_env: str = "ESCROWD_KEYSTORE_PASSPHRASE"
    passphrase_file: PathValue | None = None
    credential_name: str = "keystore-passphrase"
    scrypt_log2_n: Annotated[int, Field(ge=10, le=22)] = 15


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8725
    page_size_max: Annotated[int, Field(ge=1, le=1000)] = 200
    # Requests per window of an API key without a limit of its own ("N/<duration>", s/m/h).
    rate_limit: str = "6000/60s"

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            parse_limit(value)
        except ValidationFailed as exc:
            raise ValueError(exc.message) from None
        return value

    # Processes serving the API on one shared socket (`escrowd run`); 0: one per core.
    # SQLite serves from one process whatever this says.
    workers: Annotated[int, Field(ge=0, le=256)] = 0


class WorkerSettings(_Section):
    """Where the jobs process (`--role worker` or `all`) serves /healthz, /readyz and
    /metrics, so Prometheus scrapes its job series beside the API's."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8726


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console", "auto"] = "auto"


class EvmChainSettings(_Section):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
    chain_id: PositiveInt
    rpc_urls: Annotated[list[str], Field(min_length=1)]
    usdc_address: Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$")]
    usdc_decimals: Annotated[int, Field(ge=0, le=36)] = 6
    confirmations: NonNegativeInt = 12
    start_block: NonNegativeInt = 0
    max_block_window: Annotated[int, Field(ge=1, le=1_000_000)] = 2_000
    max_logs_per_window: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    max_reorg_depth: Annotated[int, Field(ge=1, le=10_000)] = 64
    poll_interval_s: PositiveFloat = 4.0
    rpc_timeout_s: PositiveFloat = 10.0
    rpc_max_retries: Annotated[int, Field(ge=0, le=20)] = 4
    max_lag_blocks: PositiveInt = 200
    max_fee_gwei: PositiveInt = 200
    # Transfers of other ERC-20 tokens into deposit addresses: how often they are looked
    # for (0: never) and how many addresses one eth_getLogs topic filter names.
    token_scan_interval_s: NonNegativeFloat = 300.0
    token_scan_batch_addresses: Annotated[int, Field(ge=1, le=10_000)] = 500

    @field_validator("usdc_decimals")
    @classmethod
    def _reconciles_with_ledger_scale(cls, value: int) -> int:
        scale = LEDGER_DECIMALS["USDC"]
        if value < scale:
            raise ValueError(
                f"{value} is below the ledger's USDC scale of {scale} decimals: USDC balances "
                f"are kept in units of 10^-{scale} and could not all be paid out on this "
                "chain; check the token's decimals"
            )
        return value

    @model_validator(mode="after")
    def _reorg_covers_confirmations(self) -> EvmChainSettings:
        if self.max_reorg_depth < self.confirmations:
            raise ValueError(
                f"max_reorg_depth ({self.max_reorg_depth}) must be >= confirmations "
                f"({self.confirmations}) so a reorg inside the confirmation depth is seen"
            )
        return self


class SolanaSettings(_Section):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = "solana"
    rpc_urls: Annotated[list[str], Field(min_length=1)]
    usdc_mint: Annotated[str, Field(pattern=r"^[1-9A-HJ-NP-Za-km-z]{32,44}$")]
    poll_interval_s: PositiveFloat = 2.0
    rpc_timeout_s: PositiveFloat = 10.0
    rpc_max_retries: Annotated[int, Field(ge=0, le=20)] = 4
    # Pages overlap by one signature (proof that the node knew `before`), so at least 2.
    signatures_page_limit: Annotated[int, Field(ge=2, le=1000)] = 1000
    block_scan_threshold: PositiveInt = 500
    max_lag_slots: PositiveInt = 1_000
    # None: a first start (no cursor yet) begins at the current finalized slot.
    start_slot: NonNegativeInt | None = None
    # Per-address mode: every deposit address's USDC token accounts are listed again
    # within this time, finding token accounts other than its ATA.
    token_account_rescan_s: PositiveFloat = 600.0


class EscrowSettings(_Section):
    default_fee_bps: Annotated[int, Field(ge=0, le=10_000)] = 250
    expiry_interval_s: PositiveFloat = 30.0


class SubscriptionSettings(_Section):
    interval_s: PositiveFloat = 60.0
    retry_after_s: PositiveFloat = 3600.0
    max_charge_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    max_catch_up_periods: Annotated[int, Field(ge=1, le=1_000)] = 3
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 100


class PayoutSettings(_Section):
    interval_s: PositiveFloat = 2.0
    min_usdc_base_units: NonNegativeInt = 10_000
    min_sol_lamports: NonNegativeInt = 1_000_000
    stuck_after_s: PositiveFloat = 120.0
    sweep_interval_s: PositiveFloat = 300.0
    # A worker's claim on a payout; renewed every third of it while the payout is worked
    # on, so a killed worker's payouts wait at most this long for another worker.
    lease_s: Annotated[float, Field(ge=1.0, le=600.0)] = 10.0
    # A payout or sweep step that failed (RPC, database) is retried after retry_base_s,
    # doubling per consecutive failure up to retry_max_s.
    retry_base_s: PositiveFloat = 2.0
    retry_max_s: PositiveFloat = 300.0
    # Failing for this long logs one `payout_stalled` / `sweep_stalled` error.
    stalled_after_s: NonNegativeFloat = 60.0

    @model_validator(mode="after")
    def _backoff_grows(self) -> PayoutSettings:
        if self.retry_max_s < self.retry_base_s:
            raise ValueError(
                f"retry_max_s ({self.retry_max_s}) must be >= retry_base_s ({self.retry_base_s})"
            )
        return self


class WebhookSettings(_Section):
    interval_s: PositiveFloat = 2.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 18
    timeout_s: PositiveFloat = 10.0
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 100
    signature_tolerance_s: PositiveInt = 300
    # AEAD key for endpoint signing secrets at rest; default <data_dir>/webhook-secret.key.
    secret_key_file: PathValue | None = None


class DaemonSettings(_Section):
    shutdown_timeout_s: PositiveFloat = 30.0
    watchdog_stale_s: PositiveFloat = 120.0
    audit_checkpoint_interval_s: PositiveFloat = 300.0
    # /readyz: a chain poller is unready after this many failed polls in a row, or when
    # its last successful poll is older than unready_after_no_poll_s; any other job after
    # failing every tick for unready_after_failing_s.
    unready_after_failed_polls: PositiveInt = 5
    unready_after_no_poll_s: PositiveFloat = 120.0
    unready_after_failing_s: PositiveFloat = 300.0


class ReconcileSettings(_Section):
    # The daemon job comparing on-chain custody with the ledger (`escrowd reconcile`).
    enabled: bool = False
    interval_s: PositiveFloat = 600.0


class WalletSettings(_Section):
    # `escrowd wallets` warns when a wallet's native coin pays for fewer transactions.
    reserve_transactions: PositiveInt = 50


class Settings(_Section):
    data_dir: PathValue = Field(default_factory=default_data_dir)
    database_url: str | None = None
    keystore: KeystoreSettings = KeystoreSettings()
    api: ApiSettings = ApiSettings()
    worker: WorkerSettings = WorkerSettings()
    log: LogSettings = LogSettings()
    escrow: EscrowSettings = EscrowSettings()
    subscriptions: SubscriptionSettings = SubscriptionSettings()
    payouts: PayoutSettings = PayoutSettings()
    webhooks: WebhookSettings = WebhookSettings()
    daemon: DaemonSettings = DaemonSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    wallets: WalletSettings = WalletSettings()
    evm_chains: list[EvmChainSettings] = []
    solana: SolanaSettings | None = None

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return value

    @model_validator(mode="after")
    def _unique_chain_names(self) -> Settings:
        names = [chain.name for chain in self.evm_chains]
        if self.solana is not None:
            names.append(self.solana.name)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"chain names must be unique, repeated: {', '.join(duplicates)}")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'escrowd.db'}"

    @property
    def keystore_path(self) -> Path:
        return self.keystore.path or self.data_dir / "keystore.json"

    def evm_chain(self, name: str) -> EvmChainSettings:
        for chain in self.evm_chains:
            if chain.name == name:
                return chain
        known = ", ".join(c.name for c in self.evm_chains) or "none configured"
        raise SettingsError(f"unknown EVM chain {name!r} (configured: {known})")


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The settings section a field holds (unwrapping ``X | None``), or None for a value."""
    if get_origin(annotation) in (Union, types.UnionType):
        models = [_section_model(arg) for arg in get_args(annotation)]
        found = [model for model in models if model is not None]
        return found[0] if found else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def names_a_setting(path: list[str]) -> bool:
    """Whether ["api", "port"] (from ESCROWD_API__PORT) is a key of Settings."""
    model: type[BaseModel] | None = Settings
    for depth, part in enumerate(path):
        if model is None:
            return False
        field_info = model.model_fields.get(part)
        if field_info is None:
            return False
        if depth + 1 < len(path):
            model = _section_model(field_info.annotation)
    return True


def _env_overrides(environ: dict[str, str], skip: frozenset[str]) -> dict[str, Any]:
    """Turn ESCROWD_A__B=v into {"a": {"b": v}}; values that parse as JSON are decoded.
    Variables naming no setting are warned about and left out."""
    overrides: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in skip or name.startswith("ESCROWD_TEST_"):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if not names_a_setting(path):
            log.warning(
                "unknown_environment_variable",
                variable=name,
                detail="names no setting (see escrowd.example.toml); ignored",
            )
            continue
        value: Any = raw
        if raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise SettingsError(f"{name}: not valid JSON ({exc.msg})") from exc
        else:
            # Scalars: numbers and booleans decode as JSON, anything else stays a string.
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        target = overrides
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return overrides


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(root)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling against escrowd.example.toml)")
        else:
            lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def load_settings(
    config_path: Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Load settings; raise SettingsError naming every bad key."""
    env = dict(os.environ if environ is None else environ)
    path = config_path or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise SettingsError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    skip = set(NOT_SETTINGS)
    passphrase_env = data.get("keystore", {}).get("passphrase_env")
    if isinstance(passphrase_env, str):
        skip.add(passphrase_env)
    overrides = _env_overrides(env, frozenset(skip))
    if overrides:
        source += " + ESCROWD_* environment"
    try:
        return Settings.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        raise SettingsError(_describe(exc, source)) from None
