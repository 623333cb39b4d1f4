"""When the daemon wakes up to work: every N seconds, or at the times a cron expression names.

Cron expressions are parsed and evaluated by APScheduler's CronTrigger. Five fields are standard
crontab (minute hour day month day-of-week); six put a seconds field first. Numeric days of the
week are refused: APScheduler 3 counts them from Monday, crontab from Sunday, and a schedule that
silently runs a day off is worse than asking for ``mon``..``sun``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from apscheduler.triggers.cron import CronTrigger

from storage.errors import InvalidInput

_DIGIT = re.compile(r"\d")


class Wakeups(Protocol):
    """When to look at the queue: at start-up or not, then the next time after ``now``."""

    @property
    def at_start(self) -> bool: ...

    def next_after(self, now: datetime) -> datetime: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Every:
    """Poll the queue every ``seconds``."""

    seconds: float
    at_start: bool = True

    def next_after(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.seconds)

    def describe(self) -> str:
        return f"every {self.seconds:g} s"


@dataclass(frozen=True)
class Cron:
    """Apply what is pending at the fire times of a cron expression."""

    expression: str
    trigger: CronTrigger
    at_start: bool = False

    def next_after(self, now: datetime) -> datetime:
        fire = self.trigger.get_next_fire_time(None, now)
        if fire is None:
            raise InvalidInput(f"the schedule {self.expression!r} never fires again")
        return fire

    def describe(self) -> str:
        return f"cron {self.expression!r} ({self.trigger.timezone})"


def parse_cron(expression: str, timezone: str | None = None) -> Cron:
    """A Cron from 5 crontab fields, or 6 with seconds first; InvalidInput with the reason otherwise."""
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise InvalidInput(
            f"--schedule {expression!r}: expected 5 fields (minute hour day month day-of-week) "
            f"or 6 (second first), got {len(fields)}"
        )
    if _DIGIT.search(fields[-1]):
        raise InvalidInput(
            f"--schedule {expression!r}: write the day of the week as mon..sun, not a number "
            "(crontab and APScheduler number the days differently)"
        )
    try:
        if len(fields) == 5:
            trigger = CronTrigger.from_crontab(expression, timezone=timezone)
        else:
            second, minute, hour, day, month, day_of_week = fields
            trigger = CronTrigger(
                second=second,
                minute=minute,
                hour=hour,
                day=day,
                month=month,
                day_of_week=day_of_week,
                timezone=timezone,
            )
    except (ValueError, LookupError) as error:
        raise InvalidInput(f"--schedule {expression!r}: {error}") from error
    return Cron(expression, trigger)
