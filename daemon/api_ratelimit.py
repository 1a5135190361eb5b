"""Rate limits at the HTTP edge: the RateLimit-* headers, Retry-After, the metric, OpenAPI.

The auth dependency (api_deps) counts the request and leaves its `Quota` in
``request.state``; `RateLimitHeaders`, a plain ASGI middleware, writes it into the
response's headers, whatever the route answered, so every authenticated answer carries
them (IETF draft "RateLimit header fields for HTTP": limit, remaining, seconds to reset).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from escrowd.escrow.ratelimit import Quota

# The request.state attribute the auth dependency sets.
STATE_ATTR = "rate_limit"

RATE_LIMITED = Counter(
    "escrowd_api_rate_limited_total",
    "API requests refused with 429, by the key's public prefix.",
    ["key"],
)

_HEADERS = {
    "RateLimit-Limit": "Requests the API key may make per window.",
    "RateLimit-Remaining": "Requests left in the current window.",
    "RateLimit-Reset": "Seconds until the current window ends.",
}
_RETRY_AFTER = "Seconds to wait before the next request (the window's end)."


def header_values(quota: Quota) -> list[tuple[str, str]]:
    return [
        ("RateLimit-Limit", str(quota.limit)),
        ("RateLimit-Remaining", str(quota.remaining)),
        ("RateLimit-Reset", str(quota.reset_s)),
    ]


class RateLimitHeaders:
    """Adds the RateLimit-* headers (and Retry-After on a 429) of the request's quota."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The dict Request.state writes into, for this request.
        values: dict[str, Any] = scope.setdefault("state", {})

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                quota = values.get(STATE_ATTR)
                if isinstance(quota, Quota):
                    headers = MutableHeaders(scope=message)
                    for name, value in header_values(quota):
                        headers[name] = value
                    if message["status"] == 429:
                        headers["Retry-After"] = str(quota.reset_s)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def document(openapi: dict[str, Any]) -> None:
    """Every authenticated operation's answers name the RateLimit-* headers, and its 429
    names Retry-After too."""
    header_docs = {
        name: {"description": text, "schema": {"type": "integer"}}
        for name, text in _HEADERS.items()
    }
    for item in openapi.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict) or not operation.get("security"):
                continue
            for status, response in operation.get("responses", {}).items():
                headers = response.setdefault("headers", {})
                headers.update(header_docs)
                if status == "429":
                    headers["Retry-After"] = {
                        "description": _RETRY_AFTER,
                        "schema": {"type": "integer"},
                    }
