"""What every API route shares: the app's state, authentication and idempotent mutations."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import Unavailable
from escrowd.config.settings import Settings
from escrowd.escrow import apikeys, idempotency, service
from escrowd.escrow.agent_cache import AgentCache
from escrowd.escrow.audit import canonical_json
from escrowd.escrow.payouts import PlatformAddresses
from escrowd.escrow.uow import in_transaction
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import Agent, ApiScope
from escrowd.models.db import make_session_factory, statement_rows
from escrowd.wallets.allocation import AddressDeriver

REPLAY_HEADER = "Idempotent-Replayed"

# Work inside a mutation: returns the HTTP status and the JSON body to send.
Outcome = tuple[int, dict[str, Any]]


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

    def __post_init__(self) -> None:
        self.writers = make_session_factory(self.engine)
        self.readers = make_session_factory(self.engine, read_only=True)
        self.agents = AgentCache()

    def authenticate(self, token: str | None) -> apikeys.Principal:
        """The caller's key, read by one statement: on PostgreSQL in autocommit on a
        statement connection, a round trip where a read transaction takes three."""
        if self.engine.dialect.name == "postgresql":

            def lookup(prefix: str) -> apikeys.KeyRow | None:
                rows = statement_rows(self.engine, apikeys.PG_KEY_LOOKUP, (prefix,))
                return apikeys.KeyRow(*rows[0]) if rows else None

            return apikeys.verify(token, lookup)
        principal: apikeys.Principal = self.read(lambda s: apikeys.authenticate(s, token))
        return principal

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


_bearer = HTTPBearer(auto_error=False, description="An API key: `Bearer esk_<prefix>_<secret>`")


def _authenticate(
    request: Request, credentials: HTTPAuthorizationCredentials | None, scope: ApiScope
) -> apikeys.Principal:
    token = credentials.credentials if credentials is not None else None
    principal = state_of(request).authenticate(token)
    principal.require(scope)
    return principal


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
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=idempotency.MAX_KEY_LENGTH,
        description="Required: a unique value per operation; a retry with the same key "
        "and body gets the stored response, the same key with another body gets 409.",
    ),
]


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
