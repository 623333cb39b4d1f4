"""One batch: claim -> edit (the engine measures before and after) -> checkpoint file -> one commit.

The commit records the checkpoint, edit, metrics, statuses and audit events in one transaction.
Everything before it is tentative (HeldModel.tentative): when anything fails, the weights go back
to the last committed checkpoint, the new file is deleted and the claimed corrections return to
the queue. A batch the engine refuses counts as one try for each of its corrections
(:class:`RetryPolicy`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from daemon.checkpoint_files import NewCheckpoint, Origin
from daemon.faults import crash_point
from daemon.generation import generation_metrics, said
from daemon.held import HeldModel, Tentative
from daemon.logs import Timer
from daemon.metrics import batch_metrics
from daemon.stopping import Abandon, StopControl
from daemon.workspace import edit_request
from engine.editor import EditFailed, EditOutcome
from storage.checkpoints import applied_corrections, audit_checkpoint
from storage.db import Session
from storage.edits import add_edit, add_metrics
from storage.models import Correction
from storage.queue import claim_batch, lock_corrections, mark_applied, mark_failed, mark_rejected, release_claimed
from storage.types import utcnow


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


@dataclass(frozen=True)
class RetryPolicy:
    """How many times a correction is tried before it fails for good.

    A batch the engine refuses costs each of its corrections one try. An edit that kills the
    process (out of memory, a crash in native code) never reaches the code that counts failures;
    its attempts still grow with every claim, so a correction that keeps taking the daemon down
    is set aside at its next claim instead of crashing it forever.
    """

    max_attempts: int

    def exhausted(self, claimed: Correction) -> str | None:
        """Why a just-claimed correction is not tried again (None: try it)."""
        if claimed.attempts <= self.max_attempts:
            return None
        return f"tried {claimed.attempts - 1} times; each attempt ended without a result"

    def retry(self, failed: Correction) -> bool:
        """Whether a correction whose batch the engine refused goes back to the queue."""
        return failed.attempts < self.max_attempts


@dataclass(frozen=True)
class _Release:
    """Why a failed batch's claims are released, and whether a failure to release is only logged."""

    reason: str
    only_log_failure: bool = False


_ABANDONED = _Release("abandoned on a second stop signal")
_UNEXPECTED = _Release("the batch raised an unexpected error")
_UNRECORDED = _Release("the batch could not be recorded", only_log_failure=True)


@dataclass
class _BatchWork:
    """A batch on its way from the claim to the commit."""

    claimed: list[Correction]
    started_at: datetime
    release: _Release = _UNEXPECTED
    outcome: EditOutcome | None = None
    new: NewCheckpoint | None = None
    said_before: dict[int, dict[str, float]] = field(default_factory=dict)
    said_after: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def by_id(self) -> dict[int, Correction]:
        return {c.id: c for c in self.claimed}

    @property
    def applied(self) -> list[int]:
        assert self.outcome is not None
        return [int(d.key) for d in self.outcome.applied if d.key is not None]

    @property
    def rejected(self) -> dict[int, str]:
        assert self.outcome is not None
        return {int(r.key): reason for r, reason in self.outcome.rejected if r.key is not None}


class BatchPipeline:
    """Applies batches of the queue to the held model."""

    def __init__(self, held: HeldModel, stop: StopControl) -> None:
        self.held = held
        self.stop = stop
        self.retry = RetryPolicy(held.settings.max_attempts)

    def apply(self, limit: int) -> BatchReport | None:
        """Claim up to ``limit`` corrections and apply them as one edit; None when the queue is empty."""
        held, timer = self.held, Timer({})
        started_at = utcnow()
        with timer.phase("claim"):
            claimed, exhausted = self._claim(limit)
        if exhausted:
            held.event(logging.ERROR, "corrections_failed", corrections=exhausted, reason="attempts exhausted")
        if not claimed and not exhausted:
            return None
        report = BatchReport(claimed=[c.id for c in claimed] + exhausted, failed=list(exhausted), seconds=timer.into)
        if not claimed:
            return report
        held.event(logging.INFO, "batch_claimed", corrections=[c.id for c in claimed])
        work = _BatchWork(claimed, started_at)
        try:
            with held.tentative() as tentative:
                self._edit(work, report, timer)
                crash_point("after_apply")
                work.release = _UNRECORDED
                report.applied, report.rejected = work.applied, sorted(work.rejected)
                if work.applied:
                    self._checkpoint(work, tentative, timer)
                    crash_point("after_checkpoint")
                with timer.phase("commit"), held.lease.transaction() as session:
                    pruned = self._record(session, work, report)
        except EditFailed as error:  # the engine left the model as it was
            report.failed += self._settle_failure(claimed, str(error))
            held.event(logging.ERROR, "batch_failed", corrections=[c.id for c in claimed], reason=str(error))
            return report
        except BaseException:
            self._release(claimed, work.release)
            raise
        for correction_id, reason in work.rejected.items():
            held.event(logging.WARNING, "correction_rejected", correction=correction_id, reason=reason)
        if work.applied:
            assert work.outcome is not None
            held.state = work.outcome.state
            held.delete_pruned(pruned)
            self._log_applied(report, work.outcome)
        return report

    def _claim(self, limit: int) -> tuple[list[Correction], list[int]]:
        """Claim a batch; corrections the retry policy gives up on fail instead of being tried again."""
        with self.held.lease.transaction() as session:
            claimed = claim_batch(session, limit, self.held.worker, model=self.held.name)
            exhausted = []
            for correction in claimed:
                reason = self.retry.exhausted(correction)
                if reason is not None:
                    mark_failed(session, correction, reason, worker=self.held.worker, retry=False)
                    exhausted.append(correction)
        return [c for c in claimed if c not in exhausted], [c.id for c in exhausted]

    def _edit(self, work: _BatchWork, report: BatchReport, timer: Timer) -> None:
        """Edit (the engine measures before and after); EditFailed when it refused the batch."""
        assert self.held.state is not None
        loaded = self.held.model.loaded
        try:
            with self.stop.abandonable():
                crash_point("before_apply")
                if self.held.settings.gen_metrics:
                    with timer.phase("generate"):
                        work.said_before = said(loaded.model, loaded.tokenizer, work.claimed)
                with timer.phase("edit"):
                    work.outcome = self.held.model.editor.apply(
                        [edit_request(c) for c in work.claimed], self.held.state
                    )
                report.seconds["metrics_in_edit"] = work.outcome.seconds.get("probabilities", 0.0)
                if self.held.settings.gen_metrics:
                    with timer.phase("generate"):
                        applied = [work.by_id[i] for i in work.applied]
                        work.said_after = said(loaded.model, loaded.tokenizer, applied)
        except Abandon:
            work.release = _ABANDONED
            raise

    def _checkpoint(self, work: _BatchWork, tentative: Tentative, timer: Timer) -> None:
        """The new checkpoint file (not yet recorded)."""
        held = self.held
        assert held.current is not None and work.outcome is not None
        with timer.phase("checkpoint"):
            work.new = held.write(
                tentative,
                held.model.editor.edited_weights(),
                work.outcome.state,
                Origin("edit", held.current.id, work.applied, applied_corrections(held.current) + work.applied),
            )

    def _record(self, session: Session, work: _BatchWork, report: BatchReport) -> list[str]:
        """The batch's one transaction: checkpoint, edit, metrics, statuses, audit; returns files to prune.

        On success the new checkpoint becomes the held model's current one (put back if the
        transaction fails to commit after all)."""
        held = self.held
        assert held.current is not None and work.outcome is not None
        lock_corrections(session, report.claimed)
        for correction_id, reason in work.rejected.items():
            mark_rejected(session, work.by_id[correction_id], reason, worker=held.worker)
        if not work.applied or work.new is None:
            return []
        hp = held.model.hparams
        checkpoint = held.add(session, work.new, parent_id=held.current.id)
        edit = add_edit(
            session,
            method=hp.method,
            model=held.identity,
            hparams=hp.to_dict(),
            layers=list(hp.layers),
            started_at=work.started_at,
            finished_at=utcnow(),
            timings={"engine": work.outcome.seconds, "daemon": dict(report.seconds)},
            before_id=held.current.id,
            after_id=checkpoint.id,
        )
        said_metrics = generation_metrics(work.said_before, work.said_after)
        add_metrics(session, edit.id, batch_metrics(work.outcome) + said_metrics)
        mark_applied(session, [work.by_id[i] for i in work.applied], edit.id, worker=held.worker)
        audit_checkpoint(session, checkpoint, held.actor, edit_id=edit.id)
        report.edit_id, report.checkpoint_id = edit.id, checkpoint.id
        held.current = checkpoint
        return held.prune(session)

    def _settle_failure(self, claimed: list[Correction], reason: str) -> list[int]:
        """Return a refused batch's corrections to the queue, or fail those the policy gives up on."""
        failed: list[int] = []
        with self.held.lease.transaction() as session:
            lock_corrections(session, [c.id for c in claimed])
            for correction in claimed:
                retry = self.retry.retry(correction)
                mark_failed(session, correction, reason, worker=self.held.worker, retry=retry)
                if not retry:
                    failed.append(correction.id)
        return failed

    def _release(self, claimed: list[Correction], release: _Release) -> None:
        try:
            with self.held.sessions.begin() as session:
                released = release_claimed(session, self.held.worker, actor=self.held.actor, reason=release.reason)
        except Exception as error:
            if not release.only_log_failure:
                raise
            # recovery at the next start releases them
            self.held.event(logging.ERROR, "claims_release_failed", error=str(error).splitlines()[0])
            return
        self.held.event(logging.WARNING, "claims_released", corrections=released, reason=release.reason)

    def _log_applied(self, report: BatchReport, outcome: EditOutcome) -> None:
        for d in outcome.applied:
            self.held.event(
                logging.INFO,
                "correction_applied",
                correction=d.key,
                edit=report.edit_id,
                p_target_before=d.pre.target_prob,
                p_target_after=d.post.target_prob,
                p_original_before=d.pre.original_prob,
                p_original_after=d.post.original_prob,
            )
        self.held.event(
            logging.INFO,
            "batch_applied",
            edit=report.edit_id,
            checkpoint=report.checkpoint_id,
            corrections=report.applied,
            rejected=report.rejected,
            seconds={k: round(v, 3) for k, v in report.seconds.items()},
        )
