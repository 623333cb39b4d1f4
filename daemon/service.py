"""When the daemon works: one pass over the queue, or a loop of passes at every wake-up.

``metake apply`` is one pass (:func:`apply_pending`); ``metake daemon`` (:func:`serve`) stands by
until it can take the model's lease, then runs a pass at every wake-up (a polling interval or
cron fire times) and performs revert requests within seconds in between. Losing the lease sends
it back to standing by; a stop request ends it after the batch in flight.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from daemon.batches import BatchReport
from daemon.logs import log_event, progress_safe_logging
from daemon.reverting import RevertReport
from daemon.runner import Daemon
from daemon.schedule import Wakeups
from storage.errors import UserError
from storage.leases import LeaseHeld, LeaseLost
from storage.serialize import iso
from storage.types import utcnow

STANDBY_LOG_EVERY_S = 60.0
REVERT_CHECK_EVERY_S = 5.0


@dataclass
class PassReport:
    """One pass over the queue: the reverts performed and batches applied."""

    batches: list[BatchReport] = field(default_factory=list)
    reverts: list[RevertReport] = field(default_factory=list)

    @property
    def corrections(self) -> int:
        return sum(len(b.claimed) for b in self.batches)


def run_pass(daemon: Daemon, max_corrections: int | None = None) -> PassReport:
    """Perform pending reverts, then apply batches until the queue is empty (or the limit)."""
    report = PassReport()
    pending = daemon.pending_count()
    total = pending if max_corrections is None else min(pending, max_corrections)
    disable = None if daemon.progress is None else not daemon.progress
    with (
        tqdm(total=total, unit="correction", desc="applying", disable=disable, leave=False) as bar,
        progress_safe_logging(daemon.log, bar_shown=not bar.disable),
    ):
        while not daemon.stop.requested:
            daemon.check_heartbeat()
            report.reverts += daemon.perform_reverts()
            limit = daemon.settings.batch_size
            if max_corrections is not None:
                limit = min(limit, max_corrections - report.corrections)
            if limit <= 0:
                break
            batch = daemon.apply_batch(limit)
            if batch is None:
                break
            report.batches.append(batch)
            bar.update(len(batch.claimed))
            if max_corrections is None:
                bar.total = report.corrections + daemon.pending_count()
                bar.refresh()
    return report


def apply_pending(daemon: Daemon, max_corrections: int | None = None) -> PassReport:
    """``metake apply``: one pass in the foreground; LeaseHeld (before any slow work) if a daemon runs."""
    daemon.load()
    daemon.check_lease_free()
    daemon.open()
    with daemon.holding_lease() as reverts:
        report = run_pass(daemon, max_corrections)
    report.reverts[:0] = reverts
    return report


def serve(daemon: Daemon, wakeups: Wakeups) -> None:
    """``metake daemon``: stand by for the lease, then work at every wake-up until stopped."""
    daemon.load()
    daemon.open()
    log_event(daemon.log, logging.INFO, "daemon_started", worker=daemon.worker, wakeups=wakeups.describe())
    while not daemon.stop.requested:
        if not _wait_for_lease(daemon):
            break
        try:
            with daemon.holding_lease():
                _serve_holding(daemon, wakeups)
        except LeaseHeld as error:  # another standby daemon was quicker
            log_event(daemon.log, logging.INFO, "standing_by", reason=str(error))
        except LeaseLost as error:
            log_event(daemon.log, logging.ERROR, "lease_lost", reason=str(error), action="standing by")
    log_event(daemon.log, logging.INFO, "daemon_stopped", worker=daemon.worker)


def _wait_for_lease(daemon: Daemon) -> bool:
    """Stand by until the lease looks free; False if stopped first."""
    last_logged = -STANDBY_LOG_EVERY_S
    while not daemon.stop.requested:
        try:
            holder = daemon.lease_holder()
        except UserError as error:
            holder = f"unknown ({error})"
        if holder is None:
            return True
        if time.monotonic() - last_logged >= STANDBY_LOG_EVERY_S:
            log_event(daemon.log, logging.INFO, "standing_by", reason=f"the model is being edited by {holder}")
            last_logged = time.monotonic()
        if daemon.stop.wait(min(daemon.settings.lease_seconds / 6, 5.0)):
            return False
    return False


def _serve_holding(daemon: Daemon, wakeups: Wakeups) -> None:
    """Passes at the wake-ups; revert requests are performed within seconds in between."""
    next_run = utcnow() if wakeups.at_start else wakeups.next_after(utcnow())
    if not wakeups.at_start:
        log_event(daemon.log, logging.INFO, "sleeping", until=iso(next_run))
    while not daemon.stop.requested:
        if utcnow() >= next_run:
            report = run_pass(daemon)
            worked = bool(report.batches or report.reverts)
            if worked:
                log_event(
                    daemon.log, logging.INFO, "pass_done", corrections=report.corrections, reverts=len(report.reverts)
                )
            next_run = wakeups.next_after(utcnow())
            if worked or not wakeups.at_start:  # polling an empty queue stays quiet
                log_event(daemon.log, logging.INFO, "sleeping", until=iso(next_run))
            continue
        daemon.check_heartbeat()
        if daemon.perform_reverts():
            continue
        daemon.stop.wait(min((next_run - utcnow()).total_seconds(), REVERT_CHECK_EVERY_S))
