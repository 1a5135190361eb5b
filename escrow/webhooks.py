"""Webhook endpoints, their encrypted signing secrets, fan-out of the outbox, and signatures.

Every delivery is signed twice, with the same secret:
- Standard Webhooks (standardwebhooks.com): headers ``webhook-id`` (the event id),
  ``webhook-timestamp`` (unix seconds) and ``webhook-signature: v1,<base64>``, the base64
  HMAC-SHA256 over ``"<id>.<timestamp>.<body>"`` keyed with the secret's bytes (the base64
  after ``whsec_``). Receivers in any language check it with a Standard Webhooks library.
- Escrowd-Signature, Stripe's scheme: ``t=<unix>,v1=<hex>``, the hex HMAC-SHA256 keyed
  with the whole secret string over ``"<t>.<body>"``; receivers call `verify_webhook`.
Delivery itself (ordering, retries, disabling) is in `escrow.webhook_delivery`.

Endpoint management functions take the caller's session and only flush: the caller owns
the transaction (``in_transaction(sessions, lambda s: create_endpoint(s, ...))``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from escrowd.config.errors import Conflict, EscrowdError, NotFound, Unauthorized, ValidationFailed
from escrowd.config.settings import Settings
from escrowd.escrow.events import EVENT_TYPES
from escrowd.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow

log = structlog.get_logger(__name__)

SECRET_PREFIX = "whsec_"
SIGNATURE_HEADER = "Escrowd-Signature"
EVENT_ID_HEADER = "Escrowd-Event-Id"
EVENT_TYPE_HEADER = "Escrowd-Event-Type"
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
_SECRET_BYTES = 32
ALL_EVENTS = "*"
MAX_URL_LENGTH = 2000
MAX_PAGE_SIZE = 1000
# Ciphertext layout: version byte, 12-byte nonce, AES-256-GCM ciphertext and tag.
_CIPHER_VERSION = b"\x01"
_NONCE_BYTES = 12
_KEY_BYTES = 32


class InvalidWebhookUrl(ValidationFailed):
    type = "invalid_webhook_url"


class InvalidEventTypes(ValidationFailed):
    type = "invalid_event_types"


class InvalidCursor(ValidationFailed):
    type = "invalid_cursor"


class WebhookEndpointNotFound(NotFound):
    type = "webhook_endpoint_not_found"


class WebhookDeliveryNotFound(NotFound):
    type = "webhook_delivery_not_found"


class WebhookConflict(Conflict):
    type = "webhook_conflict"


class WebhookKeyError(EscrowdError):
    """The key file for endpoint secrets is unsafe, malformed or not the one used to encrypt."""

    type = "webhook_key_error"


class WebhookVerificationFailed(Unauthorized):
    """Base of the receiver-side errors raised by `verify_webhook`."""

    type = "webhook_verification_failed"


class SignatureHeaderInvalid(WebhookVerificationFailed):
    type = "webhook_signature_header_invalid"


class SignatureMismatch(WebhookVerificationFailed):
    type = "webhook_signature_mismatch"


class TimestampOutOfTolerance(WebhookVerificationFailed):
    type = "webhook_timestamp_out_of_tolerance"


class SecretCipher:
    """AES-256-GCM for endpoint signing secrets. The associated data binds each ciphertext
    to its endpoint id, so a ciphertext copied onto another row does not decrypt."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY_BYTES:
            raise WebhookKeyError(f"webhook secret key must be {_KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretCipher(key=<redacted>)"

    @classmethod
    def from_key_file(cls, path: Path) -> SecretCipher:
        """Load the key from `path`, creating it (mode 0600, random) on first use.

        A key file readable or writable by group or others is refused: whoever reads it
        can decrypt every endpoint secret."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(base64.b64encode(secrets.token_bytes(_KEY_BYTES)) + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            log.info("webhook_key_created", path=str(path))
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise WebhookKeyError(
                f"webhook key file {path} has mode {mode:o}, readable by others: "
                f"run `chmod 600 {path}` and rotate every endpoint secret"
            )
        try:
            key = base64.b64decode(path.read_bytes().strip(), validate=True)
        except ValueError as exc:
            raise WebhookKeyError(f"webhook key file {path} is not base64") from exc
        if len(key) != _KEY_BYTES:
            raise WebhookKeyError(
                f"webhook key file {path} must hold {_KEY_BYTES} base64-encoded bytes"
            )
        return cls(key)

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretCipher:
        path = settings.webhooks.secret_key_file or settings.data_dir / "webhook-secret.key"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls.from_key_file(path)

    @staticmethod
    def _aad(endpoint_id: int) -> bytes:
        return f"escrowd:webhook_endpoint:{endpoint_id}".encode()

    def encrypt(self, plaintext: str, *, endpoint_id: int) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), self._aad(endpoint_id))
        return _CIPHER_VERSION + nonce + sealed

    def decrypt(self, ciphertext: bytes, *, endpoint_id: int) -> str:
        if ciphertext[:1] != _CIPHER_VERSION:
            raise WebhookKeyError(f"endpoint {endpoint_id}: unknown secret ciphertext version")
        nonce = ciphertext[1 : 1 + _NONCE_BYTES]
        try:
            plain = self._aead.decrypt(
                nonce, ciphertext[1 + _NONCE_BYTES :], self._aad(endpoint_id)
            )
        except InvalidTag:
            raise WebhookKeyError(
                f"endpoint {endpoint_id}: secret does not decrypt with the configured key "
                "file (was the key file replaced?); rotate the endpoint secret"
            ) from None
        return plain.decode()


def new_secret() -> str:
    """``whsec_`` and the standard base64 of 32 random bytes, the Standard Webhooks form."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks signature: the bytes the base64 after
    ``whsec_`` encodes. Secrets made before 2026-12-03 are unpadded URL-safe base64; their
    bytes are decoded from that alphabet (a receiver whose library expects the standard
    alphabet rotates such a secret)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    padded = encoded + "=" * (-len(encoded) % 4)
    if "-" in encoded or "_" in encoded:
        return base64.urlsafe_b64decode(padded)
    return base64.b64decode(padded)


def standard_signature(payload: bytes, secret: str, msg_id: str, timestamp: int) -> str:
    """The ``webhook-signature`` header value: ``v1,`` and the base64 HMAC-SHA256 of
    ``"<msg_id>.<timestamp>.<payload>"`` keyed with `secret_key(secret)`."""
    message = f"{msg_id}.{timestamp}.".encode() + payload
    digest = hmac.new(secret_key(secret), message, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(payload: bytes, secret: str, event_id: int, timestamp: int) -> dict[str, str]:
    """Both signatures of one delivery, as the headers to send."""
    msg_id = str(event_id)
    return {
        STANDARD_ID_HEADER: msg_id,
        STANDARD_TIMESTAMP_HEADER: str(timestamp),
        STANDARD_SIGNATURE_HEADER: standard_signature(payload, secret, msg_id, timestamp),
        SIGNATURE_HEADER: signature_header(payload, secret, timestamp),
    }


def sign_payload(payload: bytes, secret: str, timestamp: int) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<payload>"`` keyed with the whole secret."""
    message = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(payload: bytes, secret: str, timestamp: int) -> str:
    return f"t={timestamp},v1={sign_payload(payload, secret, timestamp)}"


def verify_webhook(
    payload: bytes,
    header: str | None,
    secret: str,
    tolerance_s: int = 300,
    now: datetime | None = None,
) -> None:
    """Check an ``Escrowd-Signature`` header for the raw request body `payload`.

    Raises SignatureHeaderInvalid (missing or malformed), TimestampOutOfTolerance (more
    than `tolerance_s` from `now`, which blocks replays) or SignatureMismatch. Any one of
    several ``v1=`` entries may match, so a sender can sign with two secrets while one is
    being rotated."""
    if not header:
        raise SignatureHeaderInvalid(f"missing {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureHeaderInvalid(f"malformed {SIGNATURE_HEADER} header: {part!r}")
        if key == "t":
            if not value.isdigit():
                raise SignatureHeaderInvalid(f"{SIGNATURE_HEADER} timestamp is not an integer")
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureHeaderInvalid(f"{SIGNATURE_HEADER} header needs t= and at least one v1=")
    current = int((now or datetime.now(UTC)).timestamp())
    if abs(current - timestamp) > tolerance_s:
        raise TimestampOutOfTolerance(
            f"signature timestamp is {current - timestamp} s from now, more than "
            f"{tolerance_s} s: reject it (replayed or the clocks disagree)"
        )
    expected = sign_payload(payload, secret, timestamp)
    # Check every candidate so the time taken does not depend on which one matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    if not matched:
        raise SignatureMismatch("no v1 signature matches the payload and secret")


def validate_url(url: str) -> str:
    if len(url) > MAX_URL_LENGTH:
        raise InvalidWebhookUrl(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    # Visible ASCII only: a URL with spaces, control characters or raw non-ASCII text is
    # ambiguous to HTTP clients (percent-encode them; use the punycode form of a host).
    if not url.isascii() or not url.isprintable() or " " in url:
        raise InvalidWebhookUrl(
            "webhook URL must be visible ASCII: percent-encode spaces, control and "
            "non-ASCII characters"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidWebhookUrl(f"webhook URL is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidWebhookUrl("webhook URL must start with http:// or https://")
    if not parts.hostname:
        raise InvalidWebhookUrl("webhook URL has no host name")
    # Credentials in the URL would be stored in plain text and show up in logs.
    if parts.username is not None or parts.password is not None:
        raise InvalidWebhookUrl(
            "webhook URL must not contain user:password@; verify the signature instead"
        )
    if port == 0:
        raise InvalidWebhookUrl("webhook URL port must be 1-65535")
    return url


def validate_event_types(event_types: Sequence[str]) -> list[str]:
    if isinstance(event_types, str) or not event_types:
        raise InvalidEventTypes('event_types must be a non-empty list, e.g. ["*"]')
    unknown = sorted({t for t in event_types if t != ALL_EVENTS and t not in EVENT_TYPES})
    if unknown:
        raise InvalidEventTypes(
            f"unknown event types {', '.join(unknown)}; known: {', '.join(sorted(EVENT_TYPES))}"
        )
    if ALL_EVENTS in event_types:
        return [ALL_EVENTS]
    return sorted(set(event_types))


def event_types_of(endpoint: WebhookEndpoint) -> list[str]:
    types: list[str] = json.loads(endpoint.event_types)
    return types


def _matches(endpoint: WebhookEndpoint, event_type: str) -> bool:
    types = event_types_of(endpoint)
    return ALL_EVENTS in types or event_type in types


def get_endpoint(session: Session, endpoint_id: int) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.deleted_at is not None:
        raise WebhookEndpointNotFound(f"webhook endpoint {endpoint_id} does not exist")
    return endpoint


def create_endpoint(
    session: Session, cipher: SecretCipher, url: str, event_types: Sequence[str] = (ALL_EVENTS,)
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint; returns it and its signing secret, shown this once only.

    It receives events emitted from now on, not earlier ones."""
    endpoint = WebhookEndpoint(
        url=validate_url(url),
        event_types=json.dumps(validate_event_types(event_types)),
        secret_ciphertext=b"",
        enabled=True,
        created_at=utcnow(),
    )
    session.add(endpoint)
    session.flush()
    secret = new_secret()
    endpoint.secret_ciphertext = cipher.encrypt(secret, endpoint_id=endpoint.id)
    session.flush()
    log.info("webhook_endpoint_created", endpoint_id=endpoint.id, url=endpoint.url)
    return endpoint, secret


def list_endpoints(session: Session) -> list[WebhookEndpoint]:
    """Every endpoint not deleted, oldest first."""
    return list(
        session.scalars(
            select(WebhookEndpoint)
            .where(WebhookEndpoint.deleted_at.is_(None))
            .order_by(WebhookEndpoint.id)
        )
    )


def delete_endpoint(session: Session, endpoint_id: int) -> WebhookEndpoint:
    """Soft-delete: the endpoint gets no new events and its queued deliveries are marked
    failed (visible in list_deliveries), since nobody will receive them."""
    endpoint = get_endpoint(session, endpoint_id)
    endpoint.deleted_at = utcnow()
    endpoint.enabled = False
    endpoint.disabled_reason = "deleted"
    stopped = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.endpoint_id == endpoint_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
        )
        .values(status=DeliveryStatus.FAILED, last_error="endpoint deleted")
    )
    session.flush()
    log.info(
        "webhook_endpoint_deleted",
        endpoint_id=endpoint_id,
        stopped_deliveries=getattr(stopped, "rowcount", None),
    )
    return endpoint


def rotate_secret(session: Session, cipher: SecretCipher, endpoint_id: int) -> str:
    """Replace the signing secret; deliveries sent from now on are signed with the new one."""
    endpoint = get_endpoint(session, endpoint_id)
    secret = new_secret()
    endpoint.secret_ciphertext = cipher.encrypt(secret, endpoint_id=endpoint.id)
    session.flush()
    log.info("webhook_secret_rotated", endpoint_id=endpoint_id)
    return secret


def enable_endpoint(session: Session, endpoint_id: int) -> WebhookEndpoint:
    """Re-enable a disabled endpoint: its queued deliveries resume, oldest first. A delivery
    that failed for good stays failed unless redelivered."""
    endpoint = get_endpoint(session, endpoint_id)
    endpoint.enabled = True
    endpoint.disabled_reason = None
    session.flush()
    log.info("webhook_endpoint_enabled", endpoint_id=endpoint_id)
    return endpoint


@dataclass(frozen=True)
class DeliveryPage:
    items: list[WebhookDelivery]
    # Pass back as `cursor` for the next (older) page; None when this page is the last.
    next_cursor: int | None


def list_deliveries(
    session: Session,
    endpoint_id: int | None = None,
    status: str | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> DeliveryPage:
    """Deliveries newest first, optionally of one endpoint and/or in one status."""
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValidationFailed(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    if cursor is not None and cursor < 1:
        raise InvalidCursor("cursor must be a positive delivery id from next_cursor")
    query = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
    if endpoint_id is not None:
        query = query.where(WebhookDelivery.endpoint_id == endpoint_id)
    if status is not None:
        if status not in set(DeliveryStatus):
            allowed = ", ".join(s.value for s in DeliveryStatus)
            raise ValidationFailed(f"status must be one of {allowed}")
        query = query.where(WebhookDelivery.status == status)
    if cursor is not None:
        query = query.where(WebhookDelivery.id < cursor)
    items = list(session.scalars(query))
    next_cursor = items[-1].id if len(items) == limit else None
    return DeliveryPage(items=items, next_cursor=next_cursor)


def redeliver(session: Session, delivery_id: int) -> WebhookDelivery:
    """Queue a delivered or failed delivery again with a fresh attempt budget. Its event
    keeps its id, so a receiver that already has it can tell it is a repeat. Ordering is by
    delivery id, so it goes out before newer queued deliveries of its endpoint."""
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        raise WebhookDeliveryNotFound(f"webhook delivery {delivery_id} does not exist")
    if delivery.status == DeliveryStatus.PENDING:
        raise WebhookConflict(f"webhook delivery {delivery_id} is already queued")
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    assert endpoint is not None
    if endpoint.deleted_at is not None:
        raise WebhookConflict(
            f"webhook endpoint {endpoint.id} of delivery {delivery_id} is deleted; "
            "create a new endpoint"
        )
    delivery.status = DeliveryStatus.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = utcnow()
    delivery.delivered_at = None
    delivery.last_error = None
    delivery.last_status_code = None
    session.flush()
    log.info("webhook_redelivery_queued", delivery_id=delivery_id, endpoint_id=endpoint.id)
    return delivery


def fan_out(session: Session, limit: int) -> int:
    """Turn up to `limit` outbox events into deliveries: one per non-deleted endpoint whose
    event types match and which existed when the event was written. Returns the number of
    events fanned out (fewer than `limit` means the outbox is drained).

    Disabled endpoints get deliveries too: they wait until the endpoint is re-enabled, so
    an endpoint that comes back misses nothing and stays in order."""
    assert limit >= 1
    # SKIP LOCKED lets two daemons fan out different events; SQLite ignores it. The
    # condition as each database writes it matches the partial index of the backlog
    # (migration 0018), which holds only events not fanned out. Columns,
    # not ORM objects, and one UPDATE for the batch: loading each event with its payload
    # and flushing its flag one by one cost the jobs process ~100 us per escrow operation.
    events = session.execute(
        select(WebhookEvent.id, WebhookEvent.type, WebhookEvent.created_at)
        .where(~WebhookEvent.fanned_out)
        .order_by(WebhookEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not events:
        return 0
    endpoints = list_endpoints(session)
    now = utcnow()
    deliveries = [
        {
            "endpoint_id": endpoint.id,
            "event_id": event_id,
            "status": DeliveryStatus.PENDING.value,
            "attempts": 0,
            "next_attempt_at": created_at,
            "created_at": now,
        }
        for event_id, event_type, created_at in events
        for endpoint in endpoints
        if endpoint.created_at <= created_at and _matches(endpoint, event_type)
    ]
    if deliveries:
        session.execute(insert(WebhookDelivery), deliveries)
    session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id.in_([event_id for event_id, _, _ in events]))
        .values(fanned_out=True)
        .execution_options(synchronize_session=False)
    )
    created = len(deliveries)
    log.debug("webhook_fan_out", events=len(events), deliveries=created)
    return len(events)
