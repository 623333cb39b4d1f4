"""What the daemon measures about each correction before and after its edit.

Efficacy on the prompt itself comes from the engine's diagnostics (it scores the prompt anyway);
this module adds what the engine does not see: the paraphrases (does the fact generalise?) and
the neighbourhood prompts (do other facts keep their answers?), and the "does the fact still
hold" test that the lifelong health checks repeat on earlier corrections.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.editor import RequestDiagnostics
from engine.requests import EditRequest
from engine.scoring import completion_scores
from storage.models import Correction

HOLDS_WITHOUT_ORIGINAL = 0.5
"""Without a known original answer, a fact holds when P(target | prompt) is above this."""


@dataclass(frozen=True)
class Probe:
    """The prompts one correction is measured on."""

    correction_id: int
    prompt: str
    target: str
    original: str | None
    paraphrases: tuple[str, ...]
    neighbors: tuple[tuple[str, str], ...]


def probe_for(correction: Correction) -> Probe:
    return Probe(
        correction_id=correction.id,
        prompt=correction.filled_prompt(),
        target=correction.target,
        original=correction.original_answer,
        paraphrases=tuple(correction.paraphrases),
        neighbors=tuple((n["prompt"], n["answer"]) for n in correction.neighbors),
    )


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


def _score_all(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]) -> list[float]:
    if not pairs:
        return []
    return completion_scores(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs])


def generalisation_and_locality(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probes: list[Probe]
) -> dict[int, dict[str, float]]:
    """Per correction: paraphrase_target_prob, paraphrase_efficacy, neighbor_answer_prob, neighbor_kept.

    All prompts of the batch are scored in one batched call. Efficacy-style figures are the
    share of prompts where the expected answer is more likely than the competing one.
    """
    pairs: list[tuple[str, str]] = []
    index: list[tuple[int, str, int]] = []  # (correction, role, item)
    for probe in probes:
        for i, paraphrase in enumerate(probe.paraphrases):
            pairs.append((paraphrase, probe.target))
            index.append((probe.correction_id, "para_target", i))
            if probe.original:
                pairs.append((paraphrase, probe.original))
                index.append((probe.correction_id, "para_original", i))
        for i, (prompt, answer) in enumerate(probe.neighbors):
            pairs.append((prompt, answer))
            index.append((probe.correction_id, "neigh_answer", i))
            pairs.append((prompt, probe.target))
            index.append((probe.correction_id, "neigh_target", i))
    scores: dict[int, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for (correction_id, role, item), score in zip(index, _score_all(model, tokenizer, pairs), strict=True):
        scores[correction_id][role][item] = score
    figures: dict[int, dict[str, float]] = {}
    for probe in probes:
        own = scores[probe.correction_id]
        result: dict[str, float] = {}
        if probe.paraphrases:
            targets = own["para_target"]
            result["paraphrase_target_prob"] = _mean([math.exp(s) for s in targets.values()])
            if probe.original:
                wins = [targets[i] > own["para_original"][i] for i in targets]
                result["paraphrase_efficacy"] = _mean([float(w) for w in wins])
        if probe.neighbors:
            answers = own["neigh_answer"]
            result["neighbor_answer_prob"] = _mean([math.exp(s) for s in answers.values()])
            result["neighbor_kept"] = _mean([float(answers[i] > own["neigh_target"][i]) for i in answers])
        figures[probe.correction_id] = result
    return figures


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def prompt_figures(diagnostics: RequestDiagnostics, phase: str) -> dict[str, float]:
    """target_prob, original_prob and efficacy on the prompt, from the engine's diagnostics."""
    target = diagnostics.pre_target_prob if phase == "pre" else diagnostics.post_target_prob
    original = diagnostics.pre_original_prob if phase == "pre" else diagnostics.post_original_prob
    figures = {"target_prob": target}
    if original is not None:
        figures["original_prob"] = original
    figures["efficacy"] = float(_holds(target, original))
    return figures


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


def _holds(target_prob: float, original_prob: float | None) -> bool:
    if original_prob is not None:
        return target_prob > original_prob
    return target_prob > HOLDS_WITHOUT_ORIGINAL


def facts_hold(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, probes: list[Probe]
) -> dict[int, tuple[float, bool]]:
    """Per correction: P(target | prompt) and whether the corrected fact holds.

    It holds when the target is more likely than the original answer (CounterFact's efficacy),
    or, without a known original, when P(target) is above one half.
    """
    pairs = [(p.prompt, p.target) for p in probes] + [(p.prompt, p.original) for p in probes if p.original]
    scores = _score_all(model, tokenizer, pairs)
    originals = iter(scores[len(probes) :])
    result: dict[int, tuple[float, bool]] = {}
    for probe, target_score in zip(probes, scores[: len(probes)], strict=True):
        original_prob = math.exp(next(originals)) if probe.original else None
        target_prob = math.exp(target_score)
        result[probe.correction_id] = (target_prob, _holds(target_prob, original_prob))
    return result
