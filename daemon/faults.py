"""Named crash points, so tests can kill the daemon at exactly the moments recovery must survive.

Setting ``METAKE_FAULT_AT`` to one of :data:`CRASH_POINTS` makes the process SIGKILL itself when
it reaches that point (Windows has no SIGKILL; there it exits at once without clean-up). It is
not a user setting and appears in no help text.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "METAKE_FAULT_AT"
CRASH_POINTS = (
    "before_apply",
    "after_apply",
    "during_checkpoint_write",
    "after_checkpoint",
    "during_revert",
)


def crash_point(name: str) -> None:
    """Die like ``kill -9`` here if the environment asks for it; otherwise do nothing."""
    if name not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if os.environ.get(FAULT_ENV) != name:
        return
    kill = getattr(signal, "SIGKILL", None)
    if kill is not None:
        os.kill(os.getpid(), kill)
    os._exit(137)
