"""Structured log lines: one line per event, an event name plus ``key=value`` fields (or JSON).

A daemon runs for months under a service manager; its log is read by people and by log
shippers alike, so every line has the same shape: time, level, event, then the event's fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

from tqdm.contrib.logging import logging_redirect_tqdm

LOGGER_NAME = "metake"
LOG_FORMATS = ("text", "json")
_FIELDS_ATTRIBUTE = "metake_fields"


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with ``fields``; the formatter writes them as key=value pairs or JSON."""
    logger.log(level, event, extra={_FIELDS_ATTRIBUTE: fields})


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(item) for item in value]
    if isinstance(value, (str, int, bool, type(None), dict)):
        return value
    return str(value)


def _flat(fields: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts become dotted keys (``seconds.edit=1.2``), so every value stays greppable."""
    flat: list[tuple[str, Any]] = []
    for key, value in fields.items():
        if isinstance(value, dict) and value:
            flat += _flat(value, f"{prefix}{key}.")
        else:
            flat.append((f"{prefix}{key}", value))
    return flat


def _logfmt_value(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    elif isinstance(value, dict):
        value = json.dumps(value, sort_keys=True, ensure_ascii=False)
    elif value is None:
        return "null"
    elif isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text == "" or any(ch.isspace() or ch in '"=' for ch in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class EventFormatter(logging.Formatter):
    """``2026-01-31T02:00:00.123Z level=info event=batch_applied edit=3 ...`` or one JSON object."""

    def __init__(self, style: str = "text") -> None:
        super().__init__()
        if style not in LOG_FORMATS:
            raise ValueError(f"unknown log format {style!r}")
        self.style = style

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        fields = getattr(record, _FIELDS_ATTRIBUTE, {})
        level = record.levelname.lower()
        if self.style == "json":
            body = {"time": at, "level": level, "event": record.getMessage()}
            body |= {key: _plain(value) for key, value in fields.items()}
            return json.dumps(body, ensure_ascii=False, allow_nan=True)
        parts = [at, f"level={level}", f"event={_logfmt_value(record.getMessage())}"]
        for key, value in _flat(fields):
            parts.append(f"{key}={_logfmt_value(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(style: str = "text", level: int = logging.INFO, stream: TextIO | None = None) -> logging.Logger:
    """Send metake's events to ``stream`` (stderr) in ``style``; replaces what an earlier call set up."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(EventFormatter(style))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


@contextmanager
def progress_safe_logging(logger: logging.Logger, bar_shown: bool) -> Iterator[None]:
    """Route console log lines through tqdm while a progress bar is on screen, so they do not tear it."""
    on_console = any(
        isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in logger.handlers
    )
    if not (bar_shown and on_console):
        yield
        return
    with logging_redirect_tqdm(loggers=[logger]):
        yield


class Timer:
    """Adds the seconds spent in named phases to a dict."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into = into

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.into[name] = self.into.get(name, 0.0) + time.perf_counter() - start
