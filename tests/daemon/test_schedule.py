"""Wake-up schedules: intervals and cron expressions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from daemon.schedule import Every, parse_cron
from storage.errors import InvalidInput


def test_cron_schedules_fire_when_the_expression_says():
    nightly = parse_cron("0 2 * * *", "UTC")
    now = datetime(2026, 1, 31, 14, 30, tzinfo=UTC)
    assert nightly.next_after(now) == datetime(2026, 2, 1, 2, 0, tzinfo=UTC)
    assert not nightly.at_start
    seconds = parse_cron("*/15 * * * * *", "UTC")
    assert seconds.next_after(datetime(2026, 1, 1, 0, 0, 7, tzinfo=UTC)) == datetime(2026, 1, 1, 0, 0, 15, tzinfo=UTC)
    weekdays = parse_cron("30 9 * * mon-fri", "UTC")
    assert weekdays.next_after(datetime(2026, 1, 31, 12, 0, tzinfo=UTC)).weekday() == 0  # Saturday -> Monday
    assert Every(5).next_after(now) == now + timedelta(seconds=5) and Every(5).at_start


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("0 2 * *", "expected 5 fields"),
        ("0 2 * * 1", "write the day of the week as mon..sun"),
        ("99 2 * * *", "--schedule '99 2 \\* \\* \\*'"),
    ],
)
def test_bad_cron_expressions_are_refused(expression, message):
    with pytest.raises(InvalidInput, match=message):
        parse_cron(expression)
