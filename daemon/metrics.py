"""The metrics a batch records: the engine's before/after scores and edit diagnostics, by name.

The engine scores every request's prompt, paraphrases and neighbourhood prompts in the same
passes it runs before and after an edit (``RequestDiagnostics.pre`` / ``.post``), so a batch
costs no extra forward passes here; this module only names what the engine measured.
"""

from __future__ import annotations

from engine.editor import EditOutcome, RequestDiagnostics
from storage.edits import MetricValue
from storage.models import Phase


def engine_metrics(diagnostics: RequestDiagnostics) -> dict[str, float]:
    """The engine's per-request diagnostics of the edit, recorded as post-edit metrics."""
    return {
        "planned_norm": diagnostics.planned_norm,
        "plan_ratio": diagnostics.plan_ratio,
        "realised_gain": diagnostics.realised_gain,
        "realised_norm": diagnostics.realised_norm,
        "upstream_steps": float(diagnostics.upstream_steps),
        "outer_steps": float(diagnostics.outer_steps),
        "passes": float(diagnostics.passes),
        "says": float(diagnostics.says),
    }


def batch_metrics(outcome: EditOutcome) -> list[MetricValue]:
    """Per applied correction: its scores before and after and the edit's diagnostics; per layer:
    the weight change."""
    values: list[MetricValue] = []
    for diagnostics in outcome.applied:
        assert diagnostics.key is not None
        correction_id = int(diagnostics.key)
        for phase, scores in ((Phase.PRE, diagnostics.pre), (Phase.POST, diagnostics.post)):
            values += [MetricValue(correction_id, name, phase, value) for name, value in scores.metrics().items()]
        values += [MetricValue(correction_id, n, Phase.POST, v) for n, v in engine_metrics(diagnostics).items()]
    for layer, value in outcome.weight_change.items():
        values.append(MetricValue(None, f"weight_change.layer{layer}", Phase.POST, value))
    for layer, value in outcome.relative_weight_change.items():
        values.append(MetricValue(None, f"relative_weight_change.layer{layer}", Phase.POST, value))
    for layer, value in outcome.restrained.items():  # only with [solver] spectral_cap
        values.append(MetricValue(None, f"spectral_cap_removed.layer{layer}", Phase.POST, value))
    return values
