"""Lifelong health checks: do earlier corrections still hold, and has the model drifted?

Every N batches the daemon re-tests a seeded sample of corrections applied before (retention)
and measures perplexity on the fixed drift sample, next to the unedited model's perplexity on
the same text. The unedited figure is measured once per process by swapping the base weights of
the edited layers in and back out (bit for bit).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.ledger import Figure
from daemon.measure import facts_hold
from daemon.workspace import Workspace
from evaluation.metrics import perplexity
from storage.models import Correction, CorrectionStatus, Phase


@dataclass
class Findings:
    """What one health check found, ready to be stored and logged."""

    figures: list[Figure] = field(default_factory=list)
    tested: int = 0
    retention: float | None = None
    """Share of the re-tested corrections that still hold (None when none were tested)."""
    forgotten: list[int] = field(default_factory=list)
    drift: dict[str, float] = field(default_factory=dict)


def sample_earlier(session: Session, exclude: list[int], size: int, seed: int) -> list[Correction]:
    """Up to ``size`` applied corrections not in ``exclude``, chosen reproducibly from ``seed``."""
    query = select(Correction.id).where(Correction.status == CorrectionStatus.APPLIED)
    if exclude:
        query = query.where(Correction.id.not_in(exclude))
    ids = sorted(session.scalars(query))
    chosen = sorted(random.Random(seed).sample(ids, min(len(ids), size)))
    if not chosen:
        return []
    return list(session.scalars(select(Correction).where(Correction.id.in_(chosen)).order_by(Correction.id)))


class HealthCheck:
    """Measures retention and drift on the workspace's live model."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self._base_perplexity: float | None = None

    def measure(self, earlier: list[Correction]) -> Findings:
        loaded = self.workspace.loaded
        findings = Findings()
        held = facts_hold(loaded.model, loaded.tokenizer, earlier)
        for correction_id, (target_prob, holds) in held.items():
            findings.figures.append(Figure(correction_id, "health.target_prob", Phase.POST, target_prob))
            findings.figures.append(Figure(correction_id, "health.holds", Phase.POST, float(holds)))
        findings.tested = len(held)
        findings.forgotten = [i for i, (_, holds) in held.items() if not holds]
        if held:
            findings.retention = 1 - len(findings.forgotten) / len(held)
            findings.figures.append(Figure(None, "health.retention", Phase.POST, findings.retention))
        texts = self.workspace.drift_texts
        if texts:
            now = perplexity(loaded.model, loaded.tokenizer, texts)
            base = self.base_perplexity()
            findings.drift = {"perplexity": now, "base_perplexity": base, "perplexity_ratio": now / base}
            findings.figures += [
                Figure(None, "health.perplexity", Phase.PRE, base),
                Figure(None, "health.perplexity", Phase.POST, now),
                Figure(None, "health.perplexity_ratio", Phase.POST, now / base),
            ]
        return findings

    def base_perplexity(self) -> float:
        """The unedited model's perplexity on the drift sample (measured once per process)."""
        if self._base_perplexity is None:
            editor, loaded = self.workspace.editor, self.workspace.loaded
            live = editor.edited_weights()
            try:
                editor.load_weights(self.workspace.base_weights)
                self._base_perplexity = perplexity(loaded.model, loaded.tokenizer, self.workspace.drift_texts)
            finally:
                editor.load_weights(live)
        return self._base_perplexity
