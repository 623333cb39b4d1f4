"""Graceful stop: the first SIGTERM/SIGINT finishes the batch in flight, a second abandons it.

Finishing is the default because a batch is worth minutes of work on a CPU; a second signal
abandons it cleanly while the model is still only being measured or edited (the engine puts the
weights back) and the claimed corrections return to the queue. Once the checkpoint is being
written the batch is always finished: that part takes a second or two.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Abandon(BaseException):  # noqa: N818 - an instruction, not an error; BaseException so no handler eats it
    """Raised inside an abandonable section when a second stop signal arrives."""


class StopControl:
    """Stop requests from signals (or from code), and sleeping that a stop request cuts short."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._signals = 0
        self._abandonable = False

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def request(self) -> None:
        self._requested.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was requested meanwhile."""
        return self._requested.wait(max(seconds, 0.0))

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        self._requested.set()
        if self._signals >= 2 and self._abandonable:
            self._abandonable = False
            raise Abandon(signal.Signals(signum).name)

    @contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Install the handlers for the duration (main thread only), then put the old ones back."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        """A section a second stop signal may interrupt with :class:`Abandon`."""
        if self._signals >= 2:
            raise Abandon("stop requested twice")
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False
