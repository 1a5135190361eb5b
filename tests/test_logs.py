"""Logging: third-party libraries quiet unless debug, tracebacks as text in JSON lines."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog

from escrowd.daemon.logs import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_libraries_speak_at_warning_unless_debug(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(fmt="json", level="info")
    logging.getLogger("httpx").info("HTTP Request: POST http://node/ 200 OK")
    logging.getLogger("apscheduler.executors.default").info("Job ran")
    logging.getLogger("httpx").warning("retrying")
    structlog.get_logger("escrowd.test").info("deposit_confirmed", chain="base")
    events = [line["event"] for line in _json_lines(capsys.readouterr().err)]
    assert events == ["retrying", "deposit_confirmed"]

    configure_logging(fmt="json", level="debug")
    logging.getLogger("httpx").info("HTTP Request: POST http://node/ 200 OK")
    assert [line["event"] for line in _json_lines(capsys.readouterr().err)] == [
        "HTTP Request: POST http://node/ 200 OK"
    ]


def test_tracebacks_are_text_in_json(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(fmt="json", level="info")
    try:
        raise ValueError("bad block")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        structlog.get_logger("escrowd.test").error("job_failed", exc_info=True)
    lines = _json_lines(capsys.readouterr().err)
    assert len(lines) == 2
    for line in lines:
        text = str(line["exception"])
        assert text.startswith("Traceback (most recent call last):")
        assert "ValueError: bad block" in text
        assert "traceback object" not in json.dumps(line)


class _Writes(io.StringIO):
    """A stream that remembers each write() call's text."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_each_line_is_one_write_so_processes_sharing_a_pipe_never_split_lines(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API workers and the jobs process write to one stderr pipe (systemd's journal):
    a line written in two calls (its text, then the newline) can have another process's
    line land between them."""
    stream = _Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging(fmt="json", level="info")
    log = structlog.get_logger("escrowd.test")
    log.info("escrow_released", job_id="job-1")
    log.warning("deposit_not_fully_credited", tx_hash="0xab")
    assert len(stream.calls) == 2
    for call in stream.calls:
        assert call.endswith("\n") and call.count("\n") == 1
        json.loads(call)
