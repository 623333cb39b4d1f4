"""The daemon: owns one model, applies the queue batch after batch, and can always be restarted.

Each batch goes claim -> measure -> edit -> measure -> checkpoint file -> one transaction that
records the checkpoint, edit, metrics, statuses and audit events. The model in memory only ever
moves forward to a state whose checkpoint is committed; when anything fails before the commit
it is put back to the last committed checkpoint and the claimed corrections return to the queue.
A kill -9 at any point is recovered at the next start the same way (see ``recover``).

When to work (one pass for ``metake apply``, wake-ups for ``metake daemon``) is daemon.service's
job; both use the batch code here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon import ledger
from daemon.checkpoint_files import (
    CheckpointContents,
    CheckpointFileError,
    WrittenFile,
    model_folder,
    new_name,
    read_checkpoint,
    remove_unlisted,
    tensors_sha256,
    write_checkpoint,
)
from daemon.faults import crash_point
from daemon.health import sample_sha256
from daemon.lease import (
    Heartbeat,
    Lease,
    LeaseHeld,
    LeaseLost,
    confirm,
    live_holder,
    release,
    try_acquire,
    worker_name,
)
from daemon.ledger import Figure
from daemon.lifelong import HealthCheck, sample_earlier
from daemon.lineage import applied_corrections, head_checkpoint
from daemon.logs import log_event
from daemon.measure import (
    edit_request,
    engine_figures,
)
from daemon.reverts import RevertRefused, check_target, lock_corrections, pending_requests, refuse, settle_done
from daemon.settings import DaemonSettings
from daemon.stopping import Abandon, StopControl
from daemon.workspace import Workspace, load_base_model, open_workspace
from engine.editor import EditFailed, EditOutcome
from engine.models import LoadedModel
from engine.state import EditorState, StateMismatch
from storage.audit import AuditKind, append_event
from storage.context import StoreContext
from storage.errors import StoreError
from storage.models import Checkpoint, Correction, Phase
from storage.queue import claim_batch, mark_applied, mark_failed, mark_rejected, release_claimed
from storage.serialize import iso
from storage.types import utcnow


class DaemonError(StoreError):
    """The daemon cannot go on safely (e.g. a checkpoint does not match its record)."""


@dataclass
class BatchReport:
    """What one batch did, and where its time went (seconds per phase)."""

    claimed: list[int]
    applied: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    edit_id: int | None = None
    checkpoint_id: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class RevertReport:
    request_id: int
    restored_checkpoint: int
    new_checkpoint: int | None
    reverted: list[int]
    refused: str | None = None
    seconds: float = 0.0


@dataclass
class _BatchWork:
    """A batch on its way from the edit to the commit."""

    claimed: list[Correction]
    outcome: EditOutcome
    started_at: datetime
    written: WrittenFile | None = None
    created_at: datetime | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None

    @property
    def by_id(self) -> dict[int, Correction]:
        return {c.id: c for c in self.claimed}

    @property
    def applied(self) -> list[int]:
        return [int(d.key) for d in self.outcome.applied if d.key is not None]

    @property
    def rejected(self) -> dict[int, str]:
        return {int(r.key): reason for r, reason in self.outcome.rejected if r.key is not None}


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


class Daemon:
    """One process's hold on one model: lease, live weights and state, and the current checkpoint."""

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
        self.sessions: sessionmaker[Session] = store.sessions()
        self.worker = worker_name()
        self.actor = self.worker[:100]
        self.loaded: LoadedModel | None = None
        self.workspace: Workspace | None = None
        self.lease: Lease | None = None
        self.heartbeat: Heartbeat | None = None
        self.state: EditorState | None = None
        self.current: Checkpoint | None = None
        """The committed checkpoint whose weights and state are live in memory (None: not restored)."""
        self._health: HealthCheck | None = None

    # ----- start-up ---------------------------------------------------------------------------

    def _event(self, level: int, event: str, **fields: Any) -> None:
        log_event(self.log, level, event, **fields)

    @property
    def model(self) -> str:
        assert self.loaded is not None
        return self.loaded.identity

    @property
    def ws(self) -> Workspace:
        assert self.workspace is not None, "open() first"
        return self.workspace

    def load(self) -> None:
        """Load the base model (fast once converted); its identity names the lease and checkpoints."""
        started = time.perf_counter()
        self.loaded = load_base_model(self.settings, self.store.home)
        self._event(
            logging.INFO,
            "model_loaded",
            model=self.loaded.source,
            identity=self.loaded.identity,
            device=self.loaded.device,
            dtype=self.loaded.dtype,
            seconds=time.perf_counter() - started,
        )

    def open(self) -> None:
        """Build the editor (statistics, projectors) and keep the unedited layers; slow the first time."""
        assert self.loaded is not None, "load() first"
        started = time.perf_counter()
        self.workspace = open_workspace(self.settings, self.store.home, self.loaded)
        hp = self.workspace.hparams
        self._event(
            logging.INFO,
            "editor_ready",
            method=hp.method,
            layers=list(hp.layers),
            health_every=self.settings.health.every,
            seconds=time.perf_counter() - started,
        )

    def check_lease_free(self) -> None:
        """Raise LeaseHeld now if a live daemon holds the model, before slow work is started."""
        with self.sessions() as session:
            holder = live_holder(session, self.model, self.worker)
        if holder is not None:
            raise LeaseHeld(f"model {self.model[:23]}… is being edited by {holder}; stop that daemon or wait")

    def acquire(self) -> None:
        """Take the model's lease (LeaseHeld if a live daemon has it) and start renewing it."""
        self.lease = try_acquire(self.sessions, self.model, self.worker, self.settings.lease_seconds)
        self.heartbeat = Heartbeat(self.sessions, self.lease, self.log).__enter__()
        self._event(logging.INFO, "lease_acquired", worker=self.worker, generation=self.lease.generation)

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
                self._event(logging.WARNING, "lease_release_failed", error=str(error).splitlines()[0])
            self.lease = None
        self.current = None
        self.state = None

    def _confirm(self, session: Session) -> None:
        """Check in this transaction that the lease is still ours (and extend it)."""
        assert self.lease is not None
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise LeaseLost("the lease heartbeat found the lease taken over")
        confirm(session, self.lease)

    def recover(self) -> list[RevertReport]:
        """Make the store and the model agree after whatever happened before (crash, takeover).

        Claims of dead workers go back to pending; checkpoint files no row keeps (written but
        never committed, or pruned but not yet deleted) are removed; pending reverts are done;
        then the newest committed checkpoint is loaded and checked against its recorded sha256.
        """
        with self.sessions.begin() as session:
            self._confirm(session)
            released = ledger.release_stale_claims(session, self.worker, "recovery: claimed but never recorded")
            keep = {c.path for c in session.scalars(select(Checkpoint).where(Checkpoint.pruned.is_(False)))}
        if released:
            self._event(logging.WARNING, "claims_released", corrections=released, reason="claimed but never recorded")
        home = self.store.home
        removed = remove_unlisted(home.checkpoints_dir / model_folder(self.model), keep, home.checkpoints_dir)
        if removed:
            self._event(logging.WARNING, "orphan_files_removed", files=[p.name for p in removed])
        reverts = self.perform_reverts()
        if self.current is None:
            self._restore_head()
        return reverts

    def _restore_head(self) -> None:
        with self.sessions() as session:
            head = head_checkpoint(session, self.model)
        if head is None:
            self._write_base_checkpoint()
            return
        started = time.perf_counter()
        contents = self._read(head)
        self._install(contents, head)
        self._event(
            logging.INFO,
            "checkpoint_restored",
            checkpoint=head.id,
            steps=contents.state.steps,
            edits=contents.state.edits,
            seconds=time.perf_counter() - started,
        )

    def _read(self, checkpoint: Checkpoint) -> CheckpointContents:
        label = f"checkpoint {checkpoint.id}"
        try:
            contents = read_checkpoint(
                self.store.home.checkpoints_dir / checkpoint.path, checkpoint.sha256, label, self.ws.loaded.device
            )
        except CheckpointFileError as error:
            raise DaemonError(f"{error}; the daemon will not start from it") from error
        try:
            self.ws.editor.check_state(contents.state)
        except StateMismatch as error:
            raise DaemonError(
                f"{label} does not fit these settings: {error}; use the hyperparameters it was made "
                "with (see `metake checkpoints --json`) or another data home"
            ) from error
        return contents

    def _install(self, contents: CheckpointContents, checkpoint: Checkpoint) -> None:
        self.ws.editor.load_weights(contents.weights)
        self.state = contents.state
        self.current = checkpoint

    def _write_base_checkpoint(self) -> None:
        """The first checkpoint: the unedited layers and a fresh editor state (prefixes chosen once)."""
        state = self.ws.editor.new_state()
        weights = self.ws.editor.edited_weights()
        written, created_at, manifest = self._write_file(weights, state, kind="base", parent=None, batch=[], applied=[])
        try:
            with self.sessions.begin() as session:
                self._confirm(session)
                row = ledger.add_checkpoint(
                    session, written, model=self.model, parent_id=None, manifest=manifest, created_at=created_at
                )
                ledger.audit_checkpoint(session, row, self.actor)
        except BaseException:
            self._discard(written)
            raise
        self.state = state
        self.current = row
        self._event(logging.INFO, "checkpoint_written", checkpoint=row.id, kind="base", size_bytes=written.size_bytes)

    # ----- files ----------------------------------------------------------------------------

    def _manifest(
        self,
        weights: dict[str, torch.Tensor],
        state: EditorState,
        *,
        kind: str,
        parent: int | None,
        batch: list[int],
        applied: list[int],
        created_at: datetime,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        hp = self.ws.hparams
        return {
            "format": "metake-checkpoint/1",
            "kind": kind,
            "parent": parent,
            "base_model": self.model,
            "model_source": self.ws.loaded.source,
            "method": hp.method,
            "hparams": hp.to_dict(),
            "corrections": batch,
            "applied_corrections": applied,
            "steps": state.steps,
            "edits": state.edits,
            "weights_sha256": tensors_sha256(weights),
            "created_at": iso(created_at),
            **(extra or {}),
        }

    def _write_file(
        self,
        weights: dict[str, torch.Tensor],
        state: EditorState,
        *,
        kind: str,
        parent: int | None,
        batch: list[int],
        applied: list[int],
        extra: dict[str, Any] | None = None,
    ) -> tuple[WrittenFile, datetime, dict[str, Any]]:
        created_at = utcnow()
        manifest = self._manifest(
            weights, state, kind=kind, parent=parent, batch=batch, applied=applied, created_at=created_at, extra=extra
        )
        relative = new_name(self.model, created_at)
        written = write_checkpoint(
            self.store.home.checkpoints_dir, relative, CheckpointContents(weights, state, manifest)
        )
        return written, created_at, manifest

    def _discard(self, written: WrittenFile) -> None:
        """Delete a checkpoint file whose transaction did not commit."""
        (self.store.home.checkpoints_dir / written.relative_path).unlink(missing_ok=True)

    def _delete_pruned(self, paths: list[str]) -> None:
        for relative in paths:
            (self.store.home.checkpoints_dir / relative).unlink(missing_ok=True)
        if paths:
            self._event(logging.INFO, "checkpoints_pruned", files=len(paths))

    # ----- reverts --------------------------------------------------------------------------

    def perform_reverts(self) -> list[RevertReport]:
        """Perform the model's pending revert requests, oldest first."""
        with self.sessions() as session:
            requests = [(r.id, r.checkpoint_id) for r in pending_requests(session, self.model)]
        return [self._perform_revert(request_id, checkpoint_id) for request_id, checkpoint_id in requests]

    def _perform_revert(self, request_id: int, checkpoint_id: int) -> RevertReport:
        """Restore a checkpoint exactly, then record it as a new checkpoint whose parent it is."""
        started = time.perf_counter()
        try:
            with self.sessions() as session:
                target, head = check_target(session, checkpoint_id)
            contents = self._read(target)
        except (RevertRefused, DaemonError) as error:
            with self.sessions.begin() as session:
                self._confirm(session)
                refuse(session, request_id, str(error), self.actor)
            self._event(
                logging.WARNING, "revert_refused", request=request_id, checkpoint=checkpoint_id, reason=str(error)
            )
            return RevertReport(request_id, checkpoint_id, None, [], refused=str(error))
        undone = sorted(set(applied_corrections(head)) - set(applied_corrections(target)))
        snapshot = self.ws.editor.edited_weights()
        previous = (self.current, self.state)
        written: WrittenFile | None = None
        try:
            self._install(contents, target)
            crash_point("during_revert")
            written, created_at, manifest = self._write_file(
                contents.weights,
                contents.state,
                kind="revert",
                parent=target.id,
                batch=[],
                applied=applied_corrections(target),
                extra={"reverted_from": head.id, "revert_request": request_id, "reverted_corrections": undone},
            )
            with self.sessions.begin() as session:
                self._confirm(session)
                rows = lock_corrections(session, undone)
                row = ledger.add_checkpoint(
                    session, written, model=self.model, parent_id=target.id, manifest=manifest, created_at=created_at
                )
                ledger.audit_checkpoint(session, row, self.actor)
                reverted = settle_done(session, request_id, rows, row, head.id, self.actor)
                pruned = ledger.prune(session, self.model, self.settings.retention, self.actor)
        except BaseException:
            self.ws.editor.load_weights(snapshot)
            self.current, self.state = previous
            if written is not None:
                self._discard(written)
            raise
        self.current = row
        self._delete_pruned(pruned)
        seconds = time.perf_counter() - started
        self._event(
            logging.INFO,
            "revert_performed",
            request=request_id,
            restored=target.id,
            checkpoint=row.id,
            reverted=reverted,
            seconds=seconds,
        )
        return RevertReport(request_id, target.id, row.id, reverted, seconds=seconds)

    # ----- batches --------------------------------------------------------------------------

    def _claim(self, limit: int) -> tuple[list[Correction], list[int]]:
        """Claim a batch; corrections already tried max_attempts times fail instead of being tried again.

        An edit that kills the process (out of memory, a crash in native code) never reaches the
        code that counts failures; its attempts still grow with every claim, so a correction
        that keeps taking the daemon down is set aside instead of crashing it forever.
        """
        with self.sessions.begin() as session:
            self._confirm(session)
            claimed = claim_batch(session, limit, self.worker)
            exhausted = [c for c in claimed if c.attempts > self.settings.max_attempts]
            for correction in exhausted:
                reason = f"tried {correction.attempts - 1} times; each attempt ended without a result"
                mark_failed(session, correction, reason, worker=self.worker, retry=False)
        return [c for c in claimed if c not in exhausted], [c.id for c in exhausted]

    def _settle_failure(self, claimed: list[Correction], reason: str) -> list[int]:
        """Return a failed batch's corrections to the queue, or fail them after max_attempts tries."""
        failed: list[int] = []
        with self.sessions.begin() as session:
            self._confirm(session)
            ledger.lock_corrections(session, [c.id for c in claimed])
            for correction in claimed:
                retry = correction.attempts < self.settings.max_attempts
                mark_failed(session, correction, reason, worker=self.worker, retry=retry)
                if not retry:
                    failed.append(correction.id)
        return failed

    def _release(self, claimed: list[Correction], reason: str) -> None:
        with self.sessions.begin() as session:
            released = release_claimed(session, self.worker, actor=self.actor, reason=reason)
        self._event(logging.WARNING, "claims_released", corrections=released, reason=reason)

    def apply_batch(self, limit: int) -> BatchReport | None:
        """Claim up to ``limit`` corrections and apply them as one edit; None when the queue is empty."""
        timer = Timer({})
        started_at = utcnow()
        with timer.phase("claim"):
            claimed, exhausted = self._claim(limit)
        if exhausted:
            self._event(logging.ERROR, "corrections_failed", corrections=exhausted, reason="attempts exhausted")
        if not claimed and not exhausted:
            return None
        report = BatchReport(claimed=[c.id for c in claimed] + exhausted, failed=list(exhausted), seconds=timer.into)
        if not claimed:
            return report
        self._event(logging.INFO, "batch_claimed", corrections=[c.id for c in claimed])
        snapshot = self.ws.editor.edited_weights()
        outcome = self._edit(claimed, snapshot, report, timer)
        if outcome is None:
            return report
        crash_point("after_apply")
        work = _BatchWork(claimed, outcome, started_at)
        report.applied, report.rejected = work.applied, sorted(work.rejected)
        try:
            if work.applied:
                self._checkpoint_batch(work, timer)
                crash_point("after_checkpoint")
            with timer.phase("commit"), self.sessions.begin() as session:
                pruned = self._record_batch(session, work, report)
        except BaseException:
            self.ws.editor.load_weights(snapshot)
            if work.written is not None:
                self._discard(work.written)
            try:
                self._release(claimed, "the batch could not be recorded")
            except Exception as error:  # noqa: BLE001 - recovery at the next start releases them
                self._event(logging.ERROR, "claims_release_failed", error=str(error).splitlines()[0])
            raise
        for correction_id, reason in work.rejected.items():
            self._event(logging.WARNING, "correction_rejected", correction=correction_id, reason=reason)
        if work.applied:
            self.state = outcome.state
            self.current = work.checkpoint
            self._delete_pruned(pruned)
            self._log_applied(report, outcome)
            self._maybe_check_health(report)
        return report

    def _edit(
        self, claimed: list[Correction], snapshot: dict[str, torch.Tensor], report: BatchReport, timer: Timer
    ) -> EditOutcome | None:
        """Edit (the engine measures before and after); None when it refused the batch (failed or retried)."""
        assert self.state is not None
        editor = self.ws.editor
        try:
            with self.stop.abandonable():
                crash_point("before_apply")
                with timer.phase("edit"):
                    outcome = editor.apply([edit_request(c) for c in claimed], self.state)
                report.seconds["metrics_in_edit"] = outcome.seconds.get("probabilities", 0.0)
        except Abandon:
            editor.load_weights(snapshot)
            self._release(claimed, "abandoned on a second stop signal")
            raise
        except EditFailed as error:
            report.failed += self._settle_failure(claimed, str(error))
            self._event(logging.ERROR, "batch_failed", corrections=[c.id for c in claimed], reason=str(error))
            return None
        except BaseException:
            editor.load_weights(snapshot)
            self._release(claimed, "the batch raised an unexpected error")
            raise
        return outcome

    def _checkpoint_batch(self, work: _BatchWork, timer: Timer) -> None:
        """The new checkpoint file (not yet recorded)."""
        assert self.current is not None
        with timer.phase("checkpoint"):
            work.written, work.created_at, work.manifest = self._write_file(
                self.ws.editor.edited_weights(),
                work.outcome.state,
                kind="edit",
                parent=self.current.id,
                batch=work.applied,
                applied=applied_corrections(self.current) + work.applied,
            )

    def _record_batch(self, session: Session, work: _BatchWork, report: BatchReport) -> list[str]:
        """The batch's one transaction: checkpoint, edit, metrics, statuses, audit; returns files to prune."""
        assert self.current is not None
        self._confirm(session)
        ledger.lock_corrections(session, report.claimed)
        for correction_id, reason in work.rejected.items():
            mark_rejected(session, work.by_id[correction_id], reason, worker=self.worker)
        if not work.applied or work.written is None:
            return []
        hp = self.ws.hparams
        work.checkpoint = ledger.add_checkpoint(
            session,
            work.written,
            model=self.model,
            parent_id=self.current.id,
            manifest=work.manifest,
            created_at=work.created_at,
        )
        edit = ledger.add_edit(
            session,
            method=hp.method,
            model=self.model,
            hparams=hp.to_dict(),
            layers=list(hp.layers),
            started_at=work.started_at,
            finished_at=utcnow(),
            timings={"engine": work.outcome.seconds, "daemon": dict(report.seconds)},
            before_id=self.current.id,
            after_id=work.checkpoint.id,
        )
        ledger.add_metrics(session, edit.id, self._batch_figures(work.outcome))
        mark_applied(session, [work.by_id[i] for i in work.applied], edit.id, worker=self.worker)
        ledger.audit_checkpoint(session, work.checkpoint, self.actor, edit_id=edit.id)
        report.edit_id, report.checkpoint_id = edit.id, work.checkpoint.id
        return ledger.prune(session, self.model, self.settings.retention, self.actor)

    def _batch_figures(self, outcome: EditOutcome) -> list[Figure]:
        figures: list[Figure] = []
        for diagnostics in outcome.applied:
            assert diagnostics.key is not None
            correction_id = int(diagnostics.key)
            for phase, scores in ((Phase.PRE, diagnostics.pre), (Phase.POST, diagnostics.post)):
                figures += [Figure(correction_id, name, phase, value) for name, value in scores.metrics().items()]
            figures += [Figure(correction_id, n, Phase.POST, v) for n, v in engine_figures(diagnostics).items()]
        for layer, value in outcome.weight_change.items():
            figures.append(Figure(None, f"weight_change.layer{layer}", Phase.POST, value))
        for layer, value in outcome.relative_weight_change.items():
            figures.append(Figure(None, f"relative_weight_change.layer{layer}", Phase.POST, value))
        return figures

    def _log_applied(self, report: BatchReport, outcome: EditOutcome) -> None:
        for d in outcome.applied:
            self._event(
                logging.INFO,
                "correction_applied",
                correction=d.key,
                edit=report.edit_id,
                p_target_before=d.pre.target_prob,
                p_target_after=d.post.target_prob,
                p_original_before=d.pre.original_prob,
                p_original_after=d.post.original_prob,
            )
        self._event(
            logging.INFO,
            "batch_applied",
            edit=report.edit_id,
            checkpoint=report.checkpoint_id,
            corrections=report.applied,
            rejected=report.rejected,
            seconds={k: round(v, 3) for k, v in report.seconds.items()},
        )

    # ----- health ---------------------------------------------------------------------------

    def _maybe_check_health(self, report: BatchReport) -> None:
        every = self.settings.health.every
        assert self.state is not None
        if not every or report.edit_id is None or self.state.steps % every:
            return
        try:
            with Timer(report.seconds).phase("health"):
                self._check_health(report)
        except LeaseLost:
            raise
        except Exception as error:  # noqa: BLE001 - the batch is committed; a failed check must not stop the daemon
            self.log.exception("health_check_failed", extra={"metake_fields": {"edit": report.edit_id}})
            self._event(logging.ERROR, "health_check_failed", edit=report.edit_id, error=str(error))

    def _check_health(self, report: BatchReport) -> None:
        """Re-test earlier corrections and measure drift; store both, warn if retention is low."""
        assert report.edit_id is not None
        started = time.perf_counter()
        if self._health is None:
            self._health = HealthCheck(self.ws)
        size = self.settings.health.sample_size
        with self.sessions() as session:
            earlier = sample_earlier(session, report.applied, size, seed=report.edit_id)
        findings = self._health.measure(earlier)
        with self.sessions.begin() as session:
            self._confirm(session)
            ledger.add_metrics(session, report.edit_id, findings.figures)
            payload = {"retention": findings.retention, "tested": findings.tested, **findings.drift}
            payload["sample"] = sample_sha256(self.ws.drift_texts)
            append_event(session, AuditKind.HEALTH_CHECKED, actor=self.actor, edit_id=report.edit_id, payload=payload)
        level = logging.INFO
        threshold = self.settings.health.retention_warning
        if findings.retention is not None and findings.retention < threshold:
            level = logging.WARNING
            self._event(
                level, "retention_low", retention=findings.retention, threshold=threshold, forgotten=findings.forgotten
            )
        self._event(
            level,
            "health_checked",
            edit=report.edit_id,
            retention=findings.retention,
            tested=findings.tested,
            seconds=time.perf_counter() - started,
            **findings.drift,
        )

    # ----- between batches --------------------------------------------------------------------

    def pending_count(self) -> int:
        with self.sessions() as session:
            return ledger.pending_count(session)

    def check_heartbeat(self) -> None:
        """Raise LeaseLost if the heartbeat found the lease taken over since the last look."""
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise LeaseLost("the lease heartbeat found the lease taken over")

    @contextmanager
    def holding_lease(self) -> Iterator[list[RevertReport]]:
        """Acquire, recover (yielding the reverts that recovery performed), and release at the end."""
        self.acquire()
        try:
            yield self.recover()
        finally:
            self.release()
