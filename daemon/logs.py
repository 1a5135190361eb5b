"""structlog set-up: JSON lines for services, readable lines for people; secrets redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Field names whose values are never written, whatever logs them.
SECRET_FIELDS = frozenset(
    {
        "api_key",
        "key",
        "mnemonic",
        "passphrase",
        "password",
        "private_key",
        "secret",
        "seed",
        "signing_secret",
        "authorization",
    }
)
REDACTED = "[redacted]"
# Libraries that log a line per request or per scheduler step: at info they drown
# escrowd's own events (httpx alone was two thirds of all lines), so they speak only at
# warning unless the operator asks for debug.
CHATTY_LIBRARIES = (
    "alembic",
    "httpx",
    "httpcore",
    "urllib3",
    "requests",
    "web3",
    "solana",
    "apscheduler",
    "uvicorn.access",
    "asyncio",
)


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for name in list(event_dict):
        if name.lower() in SECRET_FIELDS:
            event_dict[name] = REDACTED
    return event_dict


def _stderr_logger(*_args: Any) -> structlog.WriteLogger:
    # sys.stderr as it is when the logger is made, not when logging was configured: a
    # harness that swaps the stream (CliRunner, pytest) and closes it is followed.
    # One write() per line, newline included (print() makes two): processes sharing a
    # pipe (the API workers and the jobs under systemd) cannot split each other's lines,
    # and a logged request costs one system call fewer.
    return structlog.WriteLogger(sys.stderr)


def configure_logging(*, fmt: str = "auto", level: str = "info") -> None:
    """`fmt` is json, console, or auto (console on a terminal, JSON otherwise). Tracebacks
    are rendered as text in both formats; CHATTY_LIBRARIES log at warning unless `level`
    is debug."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric_level = logging.getLevelName(level.upper())
    # Libraries that log through the standard library (uvicorn, APScheduler, alembic) get
    # the same format, level, timestamp and redaction as escrowd's own events.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                redact_secrets,
                # A standard-library record's exc_info is a tuple; rendered as JSON it
                # would be "<traceback object at 0x...>".
                structlog.processors.format_exc_info,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # A uvicorn started elsewhere in this process with its own log config attached
    # handlers of its own (plain text, not propagated): route its records through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
    library_level = numeric_level if level == "debug" else max(numeric_level, logging.WARNING)
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
