"""API keys: ``esk_<prefix>_<secret>``; only SHA-256 of the secret is stored.

The prefix is public and indexed, so a lookup is one row; the secret is 256 random bits,
so a plain SHA-256 (no slow KDF) is enough and the comparison is constant-time. The full
key is shown once at creation and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from escrowd.config.errors import Forbidden, NotFound, Unauthorized, ValidationFailed
from escrowd.models import ApiKey, ApiScope, utcnow

log = structlog.get_logger(__name__)

KEY_TAG = "esk"
PREFIX_HEX_CHARS = 12
SECRET_BYTES = 32
# Each scope includes the ones before it.
SCOPE_RANK = {ApiScope.READ: 0, ApiScope.WRITE: 1, ApiScope.ADMIN: 2}


class ApiKeyNotFound(NotFound):
    type = "api_key_not_found"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, public prefix and scope (never the secret)."""

    key_id: int
    prefix: str
    scope: ApiScope

    def require(self, needed: ApiScope) -> None:
        if SCOPE_RANK[self.scope] < SCOPE_RANK[needed]:
            raise Forbidden(
                f"this API key has scope {self.scope.value!r}; the call needs "
                f"{needed.value!r}: use a key with that scope"
            )


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, *, name: str, scope: ApiScope) -> tuple[ApiKey, str]:
    """A new key row and the full key (shown to the user once; only its hash is kept)."""
    if not name or len(name) > 100:
        raise ValidationFailed("API key name must be 1 to 100 characters")
    prefix = secrets.token_hex(PREFIX_HEX_CHARS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    row = ApiKey(name=name, prefix=prefix, key_hash=_hash(secret), scope=scope.value)
    session.add(row)
    session.flush()
    log.info("api_key_created", key_id=row.id, prefix=prefix, scope=scope.value)
    return row, f"{KEY_TAG}_{prefix}_{secret}"


class KeyRow(NamedTuple):
    """What authentication reads of a key."""

    id: int
    prefix: str
    key_hash: str
    scope: str
    revoked: bool


# The same lookup as `authenticate`, for a connection of statement_rows (PostgreSQL).
PG_KEY_LOOKUP = (
    "SELECT id, prefix, key_hash, scope, revoked_at IS NOT NULL FROM api_keys WHERE prefix = %s"
)


def authenticate(session: Session, presented: str | None) -> Principal:
    """The principal of a presented key; Unauthorized when missing, malformed, unknown or
    revoked (one message for all, so a caller cannot probe which prefixes exist)."""

    def lookup(prefix: str) -> KeyRow | None:
        row = session.execute(
            select(
                ApiKey.id,
                ApiKey.prefix,
                ApiKey.key_hash,
                ApiKey.scope,
                ApiKey.revoked_at.is_not(None),
            ).where(ApiKey.prefix == prefix)
        ).one_or_none()
        return None if row is None else KeyRow(*row)

    return verify(presented, lookup)


def verify(presented: str | None, lookup: Callable[[str], KeyRow | None]) -> Principal:
    """`authenticate` with the key row read by `lookup(prefix)`."""
    invalid = Unauthorized(
        "missing or invalid API key: send 'Authorization: Bearer esk_...' with an active key"
    )
    if not presented:
        raise invalid
    tag, _, rest = presented.partition("_")
    prefix, _, secret = rest.partition("_")
    if tag != KEY_TAG or len(prefix) != PREFIX_HEX_CHARS or not secret:
        raise invalid
    row = lookup(prefix)
    # Hash even when no row matched, so timing does not reveal which prefixes exist.
    candidate = _hash(secret)
    stored = row.key_hash if row is not None else "0" * 64
    if not hmac.compare_digest(candidate, stored) or row is None or row.revoked:
        raise invalid
    return Principal(key_id=row.id, prefix=row.prefix, scope=ApiScope(row.scope))


def list_keys(session: Session) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).order_by(ApiKey.id)).all()


def revoke_key(session: Session, prefix: str) -> ApiKey:
    """Revoke a key by its public prefix; revoking twice keeps the first revocation time."""
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    if row is None:
        raise ApiKeyNotFound(f"no API key with prefix {prefix!r}; see `escrowd apikey list`")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
        log.info("api_key_revoked", key_id=row.id, prefix=prefix)
    return row
