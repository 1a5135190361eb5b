"""API keys: ``esk_<prefix>_<secret>``; only SHA-256 of the secret is stored.

The prefix is public and indexed, so a lookup is one row; the secret is 256 random bits,
so a plain SHA-256 (no slow KDF) is enough and the comparison is constant-time. The full
key is shown once at creation and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from escrowd.config.errors import Forbidden, NotFound, Unauthorized, ValidationFailed
from escrowd.config.rate_limit import RateLimit
from escrowd.escrow import audit
from escrowd.escrow.ratelimit import Quota
from escrowd.models import ApiKey, ApiScope, utcnow

log = structlog.get_logger(__name__)

KEY_TAG = "esk"
PREFIX_HEX_CHARS = 12
SECRET_BYTES = 32
# Each scope includes the ones before it.
SCOPE_RANK = {ApiScope.READ: 0, ApiScope.WRITE: 1, ApiScope.ADMIN: 2}


def scopes_allowing(needed: ApiScope) -> list[str]:
    """The scopes whose keys may make a call that needs `needed`."""
    return [scope.value for scope, rank in SCOPE_RANK.items() if rank >= SCOPE_RANK[needed]]


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


def _stream(prefix: str) -> str:
    return f"api_key:{prefix}"


def create_key(
    session: Session, *, name: str, scope: ApiScope, rate_limit: RateLimit | None = None
) -> tuple[ApiKey, str]:
    """A new key row and the full key (shown to the user once; only its hash is kept).
    `rate_limit`: the key's own limit; None follows the [api] rate_limit default."""
    if not name or len(name) > 100:
        raise ValidationFailed("API key name must be 1 to 100 characters")
    prefix = secrets.token_hex(PREFIX_HEX_CHARS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    row = ApiKey(name=name, prefix=prefix, key_hash=_hash(secret), scope=scope.value)
    limit = _set_limit(row, rate_limit)
    session.add(row)
    session.flush()
    audit.append(
        session,
        stream=_stream(prefix),
        actor="operator",
        action="api_key_created",
        details={"prefix": prefix, "name": name, "scope": scope.value, "rate_limit": limit},
    )
    log.info("api_key_created", key_id=row.id, prefix=prefix, scope=scope.value)
    return row, f"{KEY_TAG}_{prefix}_{secret}"


def _set_limit(row: ApiKey, rate_limit: RateLimit | None) -> str:
    """Store the key's own limit (None: follow the default); its text for the audit row."""
    row.rate_limit_requests = rate_limit.requests if rate_limit is not None else None
    row.rate_limit_window_s = rate_limit.window_s if rate_limit is not None else None
    return str(rate_limit) if rate_limit is not None else "default"


def key_limit(row: ApiKey) -> RateLimit | None:
    """The key's own limit; None when it follows the default."""
    if row.rate_limit_requests is None or row.rate_limit_window_s is None:
        return None
    return RateLimit(requests=row.rate_limit_requests, window_s=row.rate_limit_window_s)


def _find(session: Session, prefix: str) -> ApiKey:
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
    if row is None:
        raise ApiKeyNotFound(f"no API key with prefix {prefix!r}; see `escrowd apikey list`")
    return row


def set_rate_limit(session: Session, prefix: str, rate_limit: RateLimit | None) -> ApiKey:
    """Give a key its own limit (None: the default again); applies from its next request."""
    row = _find(session, prefix)
    limit = _set_limit(row, rate_limit)
    session.flush()
    audit.append(
        session,
        stream=_stream(prefix),
        actor="operator",
        action="api_key_rate_limit_set",
        details={"prefix": prefix, "rate_limit": limit},
    )
    log.info("api_key_rate_limit_set", key_id=row.id, prefix=prefix, rate_limit=limit)
    return row


class KeyRow(NamedTuple):
    """What authentication reads of a key."""

    id: int
    prefix: str
    key_hash: str
    scope: str
    revoked: bool


def _invalid() -> Unauthorized:
    return Unauthorized(
        "missing or invalid API key: send 'Authorization: Bearer esk_...' with an active key"
    )


def parse(presented: str | None) -> tuple[str, str]:
    """The public prefix of a presented key and the hash of its secret; Unauthorized when
    it is missing or malformed."""
    if not presented:
        raise _invalid()
    tag, _, rest = presented.partition("_")
    prefix, _, secret = rest.partition("_")
    if tag != KEY_TAG or len(prefix) != PREFIX_HEX_CHARS or not secret:
        raise _invalid()
    return prefix, _hash(secret)


def check(row: KeyRow | None, candidate_hash: str) -> Principal:
    """The principal of the key row a presented key's prefix found; Unauthorized unless
    the secret's hash matches and the key is active."""
    # Compared even when no row matched, so timing does not reveal which prefixes exist.
    stored = row.key_hash if row is not None else "0" * 64
    if not hmac.compare_digest(candidate_hash, stored) or row is None or row.revoked:
        raise _invalid()
    return Principal(key_id=row.id, prefix=row.prefix, scope=ApiScope(row.scope))


def list_keys(session: Session) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).order_by(ApiKey.id)).all()


def revoke_key(session: Session, prefix: str) -> ApiKey:
    """Revoke a key by its public prefix; revoking twice keeps the first revocation time."""
    row = _find(session, prefix)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
        audit.append(
            session,
            stream=_stream(prefix),
            actor="operator",
            action="api_key_revoked",
            details={"prefix": prefix},
        )
        log.info("api_key_revoked", key_id=row.id, prefix=prefix)
    return row


def record_exceeded(session: Session, prefix: str, seen: Quota) -> None:
    """The audit row of a key's first refused request in a window (one per window, so a
    flood of refused requests writes one row)."""
    audit.append(
        session,
        stream=_stream(prefix),
        actor=f"api_key:{prefix}",
        action="rate_limit_exceeded",
        details={"prefix": prefix, "limit": seen.limit, "retry_after_s": seen.reset_s},
    )
