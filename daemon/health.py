"""Lifelong health checks: do earlier corrections still hold, and has the model drifted?

Every N batches the daemon re-tests a seeded sample of corrections applied before (retention),
measures perplexity on the fixed drift sample (daemon.drift_sample), next to the unedited
model's perplexity on the same text, and how much of each edited layer's room for edits the
accumulated constraint has used (``Editor.room_used``: near 1, new corrections start to cost old
ones). The unedited figure is measured once per process by
swapping the base weights of the edited layers in and back out (bit for bit). With rehearsal on,
the re-tested corrections the model no longer says are queued again as new corrections
(``storage.queue.resubmit_for_rehearsal``). A failed check is logged and never stops the daemon:
the batch before it is committed already.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.drift_sample import sample_sha256
from daemon.held import HeldModel
from daemon.logs import Timer
from daemon.workspace import EditableModel, edit_request
from engine.scoring import fact_scores
from engine.state import EditorState
from evaluation.metrics import GENERATED_TOKENS, generate_greedy, perplexity, says_answer
from storage.audit import AuditKind, append_event
from storage.edits import MetricValue, add_metrics
from storage.leases import LeaseLost
from storage.models import Correction, Phase
from storage.queries import sample_applied
from storage.queue import resubmit_for_rehearsal


@dataclass
class Findings:
    """What one health check found, ready to be stored and logged."""

    metrics: list[MetricValue] = field(default_factory=list)
    tested: int = 0
    retention: float | None = None
    """Share of the re-tested corrections that still hold (None when none were tested)."""
    forgotten: list[int] = field(default_factory=list)
    unsaid: list[int] = field(default_factory=list)
    """The re-tested corrections whose greedy continuation does not say the target (rehearsal's)."""
    gen_retention: float | None = None
    """Share of them whose greedy continuation of the prompt says the target (not just prefers it)."""
    drift: dict[str, float] = field(default_factory=dict)
    room_used: dict[int, float] = field(default_factory=dict)
    """Per edited layer, the share of its room for edits in use."""


def facts_hold(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corrections: list[Correction]
) -> dict[int, tuple[float, bool]]:
    """Per correction: P(target | prompt) and whether the corrected fact holds (its prompt only)."""
    requests = [dataclasses.replace(edit_request(c), paraphrases=(), neighbors=()) for c in corrections]
    scores = fact_scores(model, tokenizer, requests)
    return {c.id: (s.target_prob, s.holds) for c, s in zip(corrections, scores, strict=True)}


class HealthCheck:
    """Measures retention and drift on the live model."""

    def __init__(self, model: EditableModel) -> None:
        self.model = model
        self._base_perplexity: float | None = None

    def measure(self, earlier: list[Correction], state: EditorState) -> Findings:
        loaded = self.model.loaded
        findings = Findings()
        findings.room_used = room = self.model.editor.room_used(state)
        findings.metrics += [MetricValue(None, f"health.room_used.layer{n}", Phase.POST, v) for n, v in room.items()]
        held = facts_hold(loaded.model, loaded.tokenizer, earlier)
        for correction_id, (target_prob, holds) in held.items():
            findings.metrics.append(MetricValue(correction_id, "health.target_prob", Phase.POST, target_prob))
            findings.metrics.append(MetricValue(correction_id, "health.holds", Phase.POST, float(holds)))
        findings.tested = len(held)
        findings.forgotten = [i for i, (_, holds) in held.items() if not holds]
        if held:
            findings.retention = 1 - len(findings.forgotten) / len(held)
            findings.metrics.append(MetricValue(None, "health.retention", Phase.POST, findings.retention))
            prompts = [c.filled_prompt() for c in earlier]
            said = generate_greedy(loaded.model, loaded.tokenizer, prompts, GENERATED_TOKENS)
            says = {c.id: says_answer(text, c.target) for c, text in zip(earlier, said, strict=True)}
            findings.metrics += [MetricValue(i, "health.says_target", Phase.POST, float(v)) for i, v in says.items()]
            findings.unsaid = [i for i, said_it in says.items() if not said_it]
            findings.gen_retention = sum(says.values()) / len(says)
            findings.metrics.append(MetricValue(None, "health.gen_retention", Phase.POST, findings.gen_retention))
        texts = self.model.drift_texts
        if texts:
            now = perplexity(loaded.model, loaded.tokenizer, texts)
            base = self.base_perplexity()
            findings.drift = {"perplexity": now, "base_perplexity": base, "perplexity_ratio": now / base}
            findings.metrics += [
                MetricValue(None, "health.perplexity", Phase.PRE, base),
                MetricValue(None, "health.perplexity", Phase.POST, now),
                MetricValue(None, "health.perplexity_ratio", Phase.POST, now / base),
            ]
        return findings

    def base_perplexity(self) -> float:
        """The unedited model's perplexity on the drift sample (measured once per process)."""
        if self._base_perplexity is None:
            editor, loaded = self.model.editor, self.model.loaded
            live = editor.edited_weights()
            try:
                editor.load_weights(self.model.base_weights)
                self._base_perplexity = perplexity(loaded.model, loaded.tokenizer, self.model.drift_texts)
            finally:
                editor.load_weights(live)
        return self._base_perplexity


class HealthChecks:
    """Runs a health check after every N-th batch of the held model and records what it found."""

    def __init__(self, held: HeldModel) -> None:
        self.held = held
        self._check: HealthCheck | None = None
        self.last: dict[str, Any] | None = None
        """What the newest check found (its audit payload), for monitoring."""

    def after_batch(self, edit_id: int | None, applied: list[int], seconds: dict[str, float]) -> None:
        """Check now if this batch's step is due (timed as ``health``); a failure is logged, not raised."""
        every = self.held.settings.health.every
        assert self.held.state is not None
        if not every or edit_id is None or self.held.state.steps % every:
            return
        try:
            with Timer(seconds).phase("health"):
                self._run(edit_id, applied)
        except LeaseLost:
            raise
        except Exception as error:  # noqa: BLE001 - the batch is committed; a failed check must not stop the daemon
            self.held.log.exception("health_check_failed", extra={"metake_fields": {"edit": edit_id}})
            self.held.event(logging.ERROR, "health_check_failed", edit=edit_id, error=str(error))

    def _run(self, edit_id: int, applied: list[int]) -> None:
        """Re-test earlier corrections and measure drift; store both, warn if retention is low."""
        held = self.held
        started = time.perf_counter()
        if self._check is None:
            self._check = HealthCheck(held.model)
        with held.sessions() as session:
            earlier = sample_applied(session, held.name, applied, held.settings.health.sample_size, seed=edit_id)
        assert held.state is not None
        findings = self._check.measure(earlier, held.state)
        room = max(findings.room_used.values())
        with held.lease.transaction() as session:
            rehearsed = self._rehearse(session, findings.unsaid) if held.settings.health.rehearse else {}
            add_metrics(session, edit_id, findings.metrics)
            payload = {"model": held.name, "retention": findings.retention, "tested": findings.tested, **findings.drift}
            payload["gen_retention"] = findings.gen_retention
            payload["room_used"] = room
            payload["sample"] = sample_sha256(held.model.drift_texts)
            if held.settings.health.rehearse:
                payload["rehearsed"] = [[old, new] for old, new in rehearsed.items()]
            append_event(session, AuditKind.HEALTH_CHECKED, actor=held.actor, edit_id=edit_id, payload=payload)
        self.last = payload
        level = logging.INFO
        threshold = held.settings.health.retention_warning
        if findings.retention is not None and findings.retention < threshold:
            level = logging.WARNING
            held.event(
                level, "retention_low", retention=findings.retention, threshold=threshold, forgotten=findings.forgotten
            )
        if room > held.settings.health.room_warning:
            level = logging.WARNING
            fullest = max(findings.room_used, key=lambda layer: findings.room_used[layer])
            held.event(level, "room_low", room_used=room, layer=fullest, threshold=held.settings.health.room_warning)
        if rehearsed:
            held.event(logging.INFO, "rehearsal_queued", corrections=list(rehearsed), queued=list(rehearsed.values()))
        held.event(
            level,
            "health_checked",
            edit=edit_id,
            retention=findings.retention,
            tested=findings.tested,
            room_used=room,
            seconds=time.perf_counter() - started,
            **findings.drift,
        )

    def _rehearse(self, session: Session, unsaid: list[int]) -> dict[int, int]:
        """Queue again, in the health check's transaction (before its audit event: the submit key
        locks come first), the unsaid corrections that are still the newest word on their fact."""
        if not unsaid:
            return {}
        corrections = list(session.scalars(select(Correction).where(Correction.id.in_(unsaid))))
        most = self.held.settings.health.max_rehearsals
        return resubmit_for_rehearsal(session, corrections, self.held.actor, model=self.held.name, max_rehearsals=most)
