"""What the daemon records about each correction, and the "does it still hold" re-test.

The engine scores every request's prompt, paraphrases and neighbourhood prompts in the same
passes it runs before and after an edit (``RequestDiagnostics.pre`` / ``.post``), so a batch
costs no extra forward passes here; this module turns those scores and the engine's edit
diagnostics into named figures, and re-tests earlier corrections for the health checks.
"""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.editor import RequestDiagnostics
from engine.requests import EditRequest
from engine.scoring import fact_scores
from storage.models import Correction


def edit_request(correction: Correction) -> EditRequest:
    """The engine's request for a correction, keyed by the correction id."""
    return EditRequest(
        prompt=correction.prompt,
        subject=correction.subject,
        target=correction.target,
        original=correction.original_answer,
        paraphrases=tuple(correction.paraphrases),
        neighbors=tuple((n["prompt"], n["answer"]) for n in correction.neighbors),
        key=str(correction.id),
    )


def engine_figures(diagnostics: RequestDiagnostics) -> dict[str, float]:
    """The engine's per-request diagnostics of the edit, recorded as post-edit figures."""
    return {
        "planned_norm": diagnostics.planned_norm,
        "plan_ratio": diagnostics.plan_ratio,
        "realised_gain": diagnostics.realised_gain,
        "realised_norm": diagnostics.realised_norm,
        "upstream_steps": float(diagnostics.upstream_steps),
        "outer_steps": float(diagnostics.outer_steps),
    }


def facts_hold(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corrections: list[Correction]
) -> dict[int, tuple[float, bool]]:
    """Per correction: P(target | prompt) and whether the corrected fact holds (its prompt only)."""
    requests = [dataclasses.replace(edit_request(c), paraphrases=(), neighbors=()) for c in corrections]
    scores = fact_scores(model, tokenizer, requests)
    return {c.id: (s.target_prob, s.holds) for c, s in zip(corrections, scores, strict=True)}
