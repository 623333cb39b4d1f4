"""Log lines: one structured line per event."""

from __future__ import annotations

import io
import json
import logging

import pytest

from daemon.logs import configure_logging, log_event


@pytest.mark.parametrize("style", ["text", "json"])
def test_events_are_one_structured_line_each(style):
    stream = io.StringIO()
    logger = configure_logging(style, stream=stream)
    log_event(logger, logging.INFO, "batch_applied", edit=3, corrections=[1, 2], reason="a b", seconds={"edit": 1.5})
    line = stream.getvalue()
    assert line.count("\n") == 1
    if style == "json":
        record = json.loads(line)
        assert record["event"] == "batch_applied" and record["corrections"] == [1, 2]
        assert record["seconds"] == {"edit": 1.5} and record["level"] == "info"
    else:
        assert 'level=info event=batch_applied edit=3 corrections=1,2 reason="a b" seconds.edit=1.5' in line
