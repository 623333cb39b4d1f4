"""The daemon: owns one model, applies the queue batch after batch, and can always be restarted.

The Daemon orchestrates; each part owns one thing:

- daemon.held: the held model (lease guard, live weights and editor state, current checkpoint)
  and ``tentative()``, the one way the model moves: forward to a committed checkpoint, or back;
- daemon.batches: one batch, claim to commit, with its retry policy;
- daemon.reverting: revert requests; daemon.health: the health checks after every N-th batch.

A kill -9 at any point is recovered at the next start (see :meth:`Daemon.recover`). When to work
(one pass for ``metake apply``, wake-ups for ``metake daemon``) is daemon.service's job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from daemon.batches import BatchPipeline, BatchReport
from daemon.checkpoint_files import chain_folder, remove_unlisted
from daemon.health import HealthChecks
from daemon.held import DaemonError, HeldModel
from daemon.monitoring import DaemonMonitor
from daemon.reverting import RevertReport, perform_reverts
from daemon.settings import DaemonSettings
from daemon.stopping import StopControl
from daemon.workspace import EditableModel
from storage.checkpoints import kept_paths
from storage.context import StoreContext
from storage.imports import abandon_dead_imports
from storage.queue import pending_count, release_stale_claims

__all__ = ["BatchReport", "Daemon", "DaemonError", "RevertReport"]

STALE_LOOP_S = 900.0
"""/healthz fails when the serving loop has not come round for this long (nor 10 lease times)."""


class Daemon:
    """One process working on one model: start-up, recovery, batches, reverts and health checks."""

    def __init__(
        self,
        store: StoreContext,
        settings: DaemonSettings,
        logger: logging.Logger,
        stop: StopControl | None = None,
        progress: bool | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.log = logger
        self.stop = stop or StopControl()
        self.progress = progress
        """True/False forces the progress bar on/off; None shows it when stderr is a terminal."""
        self.held = HeldModel(store, settings, logger)
        self.batches = BatchPipeline(self.held, self.stop)
        self.health = HealthChecks(self.held)
        self.monitor = DaemonMonitor(stale_after_s=max(10 * settings.lease_seconds, STALE_LOOP_S))
        """Figures for --metrics-port (served only when asked for; kept up to date regardless)."""

    @property
    def worker(self) -> str:
        return self.held.worker

    @property
    def name(self) -> str:
        """The served model's name (it names the lease, the checkpoint chain and the corrections claimed)."""
        return self.held.name

    @property
    def identity(self) -> str:
        """The base model's identity (every checkpoint of the chain is made from it)."""
        return self.held.identity

    @property
    def model(self) -> EditableModel:
        """The model being edited: loaded model, editor, unedited layers, drift text."""
        return self.held.model

    # ----- start-up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load the base model (fast once converted)."""
        self.held.load()

    def open(self) -> None:
        """Build the editor (statistics, projectors) and keep the unedited layers; slow the first time."""
        self.held.open()

    def lease_holder(self) -> str | None:
        """Who else holds the model's lease now, described for people; None when it is free."""
        return self.held.lease.holder()

    def check_lease_free(self) -> None:
        """Raise LeaseHeld now if a live daemon holds the model, before slow work is started."""
        self.held.lease.check_free()

    def acquire(self) -> None:
        """Take the model's lease (LeaseHeld if a live daemon has it) and start renewing it."""
        self.held.lease.acquire()
        self.monitor.lease(True)

    def release(self) -> None:
        """Stop renewing and let the lease expire now, so a successor can start at once."""
        self.monitor.lease(False)
        self.held.lease.release()
        self.held.forget()

    def recover(self) -> list[RevertReport]:
        """Make the store and the model agree after whatever happened before (crash, takeover).

        Claims of dead workers go back to pending; imports whose process died are abandoned
        (storage.imports); checkpoint files no row keeps (written but
        never committed, or pruned but not yet deleted) are removed; pending reverts are done;
        then the newest committed checkpoint is loaded and checked against its recorded sha256.
        """
        held = self.held
        reason = "claimed but never recorded"
        with held.lease.transaction() as session:
            released = release_stale_claims(session, held.worker, f"recovery: {reason}", model=held.name)
            abandoned = abandon_dead_imports(session, held.worker)
            keep = kept_paths(session)
        if released:
            held.event(logging.WARNING, "claims_released", corrections=released, reason=reason)
        if abandoned:
            held.event(logging.WARNING, "imports_abandoned", imports=abandoned)
        root = self.store.home.checkpoints_dir
        removed = remove_unlisted(root / chain_folder(held.name, held.identity), keep, root)
        if removed:
            held.event(logging.WARNING, "orphan_files_removed", files=[p.name for p in removed])
        reverts = self.perform_reverts()
        if held.current is None:
            held.restore_head()
        return reverts

    @contextmanager
    def holding_lease(self) -> Iterator[list[RevertReport]]:
        """Acquire, recover (yielding the reverts that recovery performed), and release at the end."""
        self.acquire()
        try:
            yield self.recover()
        finally:
            self.release()

    # ----- work -------------------------------------------------------------------------------

    def perform_reverts(self) -> list[RevertReport]:
        """Perform the model's pending revert requests, oldest first."""
        return perform_reverts(self.held)

    def apply_batch(self, limit: int) -> BatchReport | None:
        """Claim up to ``limit`` corrections and apply them as one edit; None when the queue is empty.

        A health check follows every N-th batch that applied corrections."""
        report = self.batches.apply(limit)
        if report is not None:
            self.health.after_batch(report.edit_id, report.applied, report.seconds)
            monitor = self.monitor
            monitor.batch_done(len(report.applied), len(report.failed), len(report.rejected), report.seconds)
            if self.health.last is not None:
                last = self.health.last
                rehearsed = len(last["rehearsed"]) if "rehearsed" in last else None
                monitor.health_checked(
                    last.get("retention"), last.get("perplexity_ratio"), last.get("room_used"), rehearsed
                )
            if self.held.current is not None:
                monitor.checkpoint_bytes.set(self.held.current.size_bytes)
            monitor.beat()
        return report

    def pending_count(self) -> int:
        with self.held.sessions() as session:
            pending = pending_count(session, self.name)
        self.monitor.queue_depth.set(pending)
        return pending

    def check_heartbeat(self) -> None:
        """Raise LeaseLost if the heartbeat found the lease taken over since the last look."""
        self.held.lease.check_heartbeat()
        self.monitor.beat()
