"""What every API route shares: the app's state, authentication, the parameters every
route takes the same way (ids in paths, filters, pages, the Idempotency-Key header) and
idempotent mutations. Parameter checks live in the types here, not in handlers."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal, NoReturn

import structlog
from fastapi import Depends, Header, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import Unavailable, ValidationFailed
from escrowd.config.rate_limit import RateLimit, parse_limit
from escrowd.config.settings import Settings
from escrowd.daemon.api_ratelimit import RATE_LIMITED, STATE_ATTR
from escrowd.daemon.api_schemas import (
    EXTERNAL_ID_PATTERN,
    MAX_EXTERNAL_ID_LENGTH,
    MAX_NETWORK_LENGTH,
    NETWORK_PATTERN,
    NETWORK_VALUES,
    PRINTABLE_PATTERN,
)
from escrowd.escrow import apikeys, idempotency, ratelimit, service
from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.audit import canonical_json
from escrowd.escrow.errors import UnknownNetwork
from escrowd.escrow.payouts import PlatformAddresses
from escrowd.escrow.uow import in_transaction
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import Agent, ApiScope, Chain, utcnow
from escrowd.models.db import make_session_factory, statement_rows
from escrowd.wallets.allocation import AddressDeriver

log = structlog.get_logger(__name__)

REPLAY_HEADER = "Idempotent-Replayed"

# Work inside a mutation: returns the HTTP status and the JSON body to send.
Outcome = tuple[int, dict[str, Any]]


def configured_networks(settings: Settings) -> dict[str, str]:
    """Every configured network and its chain family, in configuration order."""
    networks = {chain.name: Chain.EVM.value for chain in settings.evm_chains}
    if settings.solana is not None:
        networks[settings.solana.name] = Chain.SOLANA.value
    return networks


@dataclass
class ApiState:
    settings: Settings
    engine: Engine
    derivers: Mapping[str, AddressDeriver]
    cipher: SecretCipher | None = None
    platform: PlatformAddresses | None = None
    writers: sessionmaker[Session] = field(init=False)
    readers: sessionmaker[Session] = field(init=False)
    agents: AgentCache = field(init=False)
    networks: dict[str, str] = field(init=False)
    rate_limit: RateLimit = field(init=False)
    leases: ratelimit.Leases = field(init=False)

    def __post_init__(self) -> None:
        self.rate_limit = parse_limit(self.settings.api.rate_limit)
        self.writers = make_session_factory(self.engine)
        self.readers = make_session_factory(self.engine, read_only=True)
        self.agents = AgentCache()
        self.leases = ratelimit.Leases()
        self.networks = configured_networks(self.settings)

    def family(self, network: str) -> str:
        """The chain family of a configured network; UnknownNetwork listing the
        configured ones (and saying so when `network` names a configured family) if it is
        not one."""
        found = self.networks.get(network)
        if found is not None:
            return found
        known = ", ".join(self.networks) or "none configured"
        if self.networks_of(network):
            raise UnknownNetwork(
                f"{network!r} is a chain family, not a network; use a network: {known}"
            )
        raise UnknownNetwork(f"unknown network {network!r}; configured networks: {known}")

    def networks_of(self, family: str) -> list[str]:
        return [name for name, of in self.networks.items() if of == family]

    def authenticate(self, token: str | None) -> tuple[apikeys.Principal, ratelimit.Quota]:
        """The caller's key and this request's place in the key's rate-limit window
        (escrow/ratelimit.py): on PostgreSQL one statement in autocommit on a statement
        connection, one round trip, that reads the key and claims requests when this
        process holds none of its window; on SQLite a transaction, a write one only for a
        claim. Unauthorized (nothing counted) for a missing, wrong or revoked key."""
        return self._answered(self.key_read(token))

    def _answered(self, read: ratelimit.KeyRead) -> tuple[apikeys.Principal, ratelimit.Quota]:
        if self.engine.dialect.name == "postgresql":
            return self.admitted(read, statement_rows(self.engine, read.sql, read.params))
        default = self.rate_limit
        sessions = self.readers if read.leased is not None else self.writers
        rows = in_transaction(sessions, lambda s: ratelimit.admit_sqlite(s, read, default))
        return self.admitted(read, rows)

    def key_read(self, token: str | None) -> ratelimit.KeyRead:
        """What reads the presented key and counts the request, for callers that send the
        statement in a round trip of their own (the fast front); Unauthorized for a
        malformed key."""
        return self.key_read_of(*apikeys.parse(token))

    def key_read_of(self, prefix: str, candidate: str) -> ratelimit.KeyRead:
        return self.leases.key_read(prefix, candidate, self.rate_limit)

    def admitted(
        self, read: ratelimit.KeyRead, rows: list[tuple[Any, ...]]
    ) -> tuple[apikeys.Principal, ratelimit.Quota]:
        """The principal and quota the answer to `read` gives (Unauthorized if none)."""
        key, quota = self.leases.admitted(read, rows)
        principal = apikeys.check(apikeys.KeyRow(*key) if key is not None else None, read.candidate)
        if quota is None:
            # An active key whose limit changed since this process claimed requests under
            # the old one: claim under the new one now.
            return self._answered(self.key_read_of(read.prefix, read.candidate))
        return principal, quota

    def admit(
        self,
        principal: apikeys.Principal,
        quota: ratelimit.Quota,
        scope: MutableMapping[str, Any],
        required: ApiScope,
    ) -> apikeys.Principal:
        """Let an authenticated request through: its quota left in the ASGI scope's state
        for the RateLimit-* headers, 429 past the limit, 403 without the scope needed."""
        values = scope.setdefault("state", {})
        values[STATE_ATTR] = quota
        if quota.refused:
            self.refuse(principal, quota)
        principal.require(required)
        # A request the fast front hands on to FastAPI is not counted a second time.
        values[_ADMITTED] = (principal, quota)
        return principal

    def refuse(self, principal: apikeys.Principal, quota: ratelimit.Quota) -> NoReturn:
        """Answer a request over its key's limit: counted in the metric, and the window's
        first refusal recorded in the audit trail."""
        RATE_LIMITED.labels(key=principal.prefix).inc()
        if quota.first_refused:
            in_transaction(
                self.writers, lambda s: apikeys.record_exceeded(s, principal.prefix, quota)
            )
            log.warning(
                "rate_limit_exceeded",
                prefix=principal.prefix,
                limit=quota.limit,
                retry_after_s=quota.reset_s,
            )
        raise ratelimit.RateLimited(
            f"API key {principal.prefix} used its {quota.limit} requests of this window; "
            f"retry after {quota.reset_s} s (Retry-After), or ask the operator for a higher "
            "limit (`escrowd apikey set-limit`)"
        )

    def agent(self, external_id: str) -> Agent:
        """A registered agent for naming an escrow's parties (AgentNotFound if none); its
        name may be stale (see escrow.agent_cache)."""
        return self.agents.get(
            external_id, lambda wanted: self.read(lambda s: service.get_agent(s, wanted))
        )

    def webhook_cipher(self) -> SecretCipher:
        if self.cipher is None:
            self.cipher = SecretCipher.from_settings(self.settings)
        return self.cipher

    def deriver(self, chain: str) -> AddressDeriver:
        found = self.derivers.get(chain)
        if found is None:
            raise Unavailable(
                f"keystore not unlocked: no {chain} address deriver is loaded; start the "
                "daemon with the keystore passphrase available"
            )
        return found

    def platform_addresses(self) -> PlatformAddresses:
        if self.platform is None:
            raise Unavailable(
                "keystore not unlocked: escrowd cannot tell its own wallets from a "
                "withdrawal destination; start the daemon with the keystore passphrase "
                "available"
            )
        return self.platform

    def read(self, work: Callable[[Session], Any]) -> Any:
        with self.readers() as session, session.begin():
            return work(session)


def state_of(request: Request) -> ApiState:
    state = request.app.state.escrowd
    assert isinstance(state, ApiState)
    return state


# The ASGI scope's state key of a request's admitted (principal, quota).
_ADMITTED = "escrowd_admitted"

_bearer = HTTPBearer(auto_error=False, description="An API key: `Bearer esk_<prefix>_<secret>`")


def _authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None, scope: ApiScope
) -> apikeys.Principal:
    token = credentials.credentials if credentials is not None else None
    state = state_of(request)
    admitted = request.scope.get("state", {}).get(_ADMITTED)
    principal, quota = admitted if admitted is not None else state.authenticate(token)
    return state.admit(principal, quota, request.scope, scope)


def _read_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> apikeys.Principal:
    return _authenticate(request, credentials, ApiScope.READ)


def _write_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> apikeys.Principal:
    return _authenticate(request, credentials, ApiScope.WRITE)


def _admin_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> apikeys.Principal:
    return _authenticate(request, credentials, ApiScope.ADMIN)


ReadKey = Annotated[apikeys.Principal, Depends(_read_key)]
WriteKey = Annotated[apikeys.Principal, Depends(_write_key)]
AdminKey = Annotated[apikeys.Principal, Depends(_admin_key)]
IdempotencyKeyHeader = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=idempotency.MAX_KEY_LENGTH,
        # Visible ASCII: what HTTP header values carry unambiguously (a UUID fits).
        pattern=r"^[!-~]+$",
        description="Required: a unique value per operation; a retry with the same key "
        "and body gets the stored response, the same key with another body gets 409.",
    ),
]

AgentIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_EXTERNAL_ID_LENGTH,
        pattern=EXTERNAL_ID_PATTERN,
        description="The marketplace's id of the agent.",
    ),
]
JobIdPath = Annotated[
    str,
    Path(min_length=1, max_length=MAX_EXTERNAL_ID_LENGTH, pattern=EXTERNAL_ID_PATTERN),
]
ChainFamilyPath = Annotated[
    Literal["evm", "solana"],
    Path(description="A chain family: one address serves every network of the family."),
]
RowIdPath = Annotated[int, Path(ge=1, le=2**62)]
RowIdQuery = Annotated[int | None, Query(ge=1, le=2**62)]
Cursor = Annotated[int | None, Query(ge=1, le=2**62, description="next_cursor of the last page")]
AgentQuery = Annotated[
    str | None,
    Query(min_length=1, max_length=MAX_EXTERNAL_ID_LENGTH, pattern=EXTERNAL_ID_PATTERN),
]
JobQuery = AgentQuery
AuditStreamQuery = Annotated[
    str | None, Query(min_length=1, max_length=160, pattern=PRINTABLE_PATTERN)
]


def _network_filter(
    request: Request,
    network: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_NETWORK_LENGTH,
            pattern=NETWORK_PATTERN,
            description="Only this network (GET /v1/networks lists them).",
            json_schema_extra=NETWORK_VALUES,
        ),
    ] = None,
    chain: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_NETWORK_LENGTH,
            pattern=NETWORK_PATTERN,
            deprecated=True,
            description="The old name of `network`.",
            json_schema_extra=NETWORK_VALUES,
        ),
    ] = None,
) -> str | None:
    if network is not None and chain is not None and network != chain:
        raise ValidationFailed("?network= and its old name ?chain= disagree; send network only")
    name = network if network is not None else chain
    if name is not None:
        state_of(request).family(name)
    return name


# A configured network's name, or None for all; an unknown name is a 400 listing them.
NetworkFilter = Annotated[str | None, Depends(_network_filter)]


def in_future(moment: datetime | None, field_name: str) -> datetime | None:
    """`moment` if it lies ahead; a ValidationFailed naming `field_name` if it has passed.
    Checked inside the idempotent work, so a retry after that time replays the answer."""
    if moment is not None and moment <= utcnow():
        raise ValidationFailed(
            f"{field_name} {moment.isoformat()} has already passed; give a time in the future"
        )
    return moment


def mutate(
    request: Request,
    principal: apikeys.Principal,
    key: str | None,
    body: BaseModel | None,
    work: Callable[[Session], Outcome],
    *,
    redact: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Response:
    """Run `work` once per idempotency key, in one transaction with its stored response.

    `redact` removes what must not be stored (a webhook secret) from the stored copy;
    replays return that copy. Failed requests are not stored: nothing changed, so a retry
    with the same key runs again."""
    checked_key = idempotency.check_key(key)
    canonical = canonical_json(body.model_dump(mode="json")) if body is not None else ""
    digest = idempotency.request_hash(request.method, request.url.path, canonical)
    state = state_of(request)

    def transaction(session: Session) -> tuple[idempotency.StoredResponse, bool]:
        claim = idempotency.begin(
            session,
            principal=principal.prefix,
            key=checked_key,
            method=request.method,
            path=request.url.path,
            digest=digest,
        )
        if isinstance(claim, idempotency.StoredResponse):
            return claim, True
        status, payload = work(session)
        text = json.dumps(payload, separators=(",", ":"))
        stored = json.dumps(redact(payload), separators=(",", ":")) if redact else text
        idempotency.finish(session, claim, status, stored)
        return idempotency.StoredResponse(status=status, body=text), False

    response, replayed = in_transaction(state.writers, transaction)
    headers = {REPLAY_HEADER: "true"} if replayed else {}
    return Response(
        content=response.body,
        status_code=response.status,
        media_type="application/json",
        headers=headers,
    )
