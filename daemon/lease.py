"""The daemon's hold on a model's lease: take it, renew it in the background, check it in every write.

A daemon edits a model only while it holds that model's lease (the rows and their rules are
storage.leases'). A heartbeat thread renews it while the main thread edits; every transaction
that records the daemon's work confirms it first, so a daemon that stalled past its lease can
never record anything.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from daemon.logs import log_event
from storage.db import Session, Sessions
from storage.errors import UserError
from storage.leases import Lease, LeaseHeld, LeaseLost, confirm, live_holder, release, renew, try_acquire


class Heartbeat:
    """Renews the lease from a background thread while the main thread edits the model."""

    def __init__(self, sessions: Sessions, lease: Lease, logger: logging.Logger) -> None:
        self._sessions = sessions
        self._lease = lease
        self._logger = logger
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metake-lease-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = self._lease.seconds / 3
        while not self._stop.wait(interval):
            try:
                renew(self._sessions, self._lease)
            except LeaseLost as error:
                log_event(self._logger, logging.ERROR, "lease_lost", reason=str(error))
                self.lost.set()
                return
            except UserError as error:  # keep trying; the lease may still hold
                log_event(self._logger, logging.WARNING, "lease_renewal_failed", error=str(error).splitlines()[0])


class LeaseGuard:
    """One process's lease on one model: acquired, renewed, confirmed in each transaction, released."""

    def __init__(self, sessions: Sessions, model: str, worker: str, seconds: float, logger: logging.Logger) -> None:
        self.sessions = sessions
        self.model = model
        self.worker = worker
        self.seconds = seconds
        self.log = logger
        self.lease: Lease | None = None
        self.heartbeat: Heartbeat | None = None

    def holder(self) -> str | None:
        """Who else holds the lease now, described for people; None when it is free to take."""
        with self.sessions() as session:
            return live_holder(session, self.model, self.worker)

    def check_free(self) -> None:
        """Raise LeaseHeld now if a live daemon holds the model, before slow work is started."""
        holder = self.holder()
        if holder is not None:
            raise LeaseHeld(f"model {self.model!r} is being edited by {holder}; stop that daemon or wait")

    def acquire(self) -> None:
        """Take the lease (LeaseHeld if a live daemon has it) and start renewing it."""
        self.lease = try_acquire(self.sessions, self.model, self.worker, self.seconds)
        self.heartbeat = Heartbeat(self.sessions, self.lease, self.log).__enter__()
        log_event(self.log, logging.INFO, "lease_acquired", worker=self.worker, generation=self.lease.generation)

    def release(self) -> None:
        """Stop renewing and let the lease expire now, so a successor can start at once."""
        if self.heartbeat is not None:
            self.heartbeat.__exit__(None, None, None)
            self.heartbeat = None
        if self.lease is not None:
            try:
                with self.sessions.begin() as session:
                    release(session, self.lease)
            except Exception as error:  # noqa: BLE001 - the lease will expire by itself anyway
                log_event(self.log, logging.WARNING, "lease_release_failed", error=str(error).splitlines()[0])
            self.lease = None

    def check_heartbeat(self) -> None:
        """Raise LeaseLost if the heartbeat found the lease taken over since the last look."""
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise LeaseLost("the lease heartbeat found the lease taken over")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A transaction that first checks the lease is still ours (and extends it)."""
        assert self.lease is not None
        with self.sessions.begin() as session:
            self.check_heartbeat()
            confirm(session, self.lease)
            yield session
