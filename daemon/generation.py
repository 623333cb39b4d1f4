"""Whether the model *says* each correction's fact, before and after its edit (greedy decoding).

The engine's before/after scores compare two answers' probabilities under teacher forcing; a
model can prefer the new target there and still not produce it when left to itself. These are
the per-correction counterparts of the bench's ``gen_*`` figures (docs/engine.md), as shares in
[0, 1]: ``gen_efficacy`` (the prompt), ``gen_paraphrase`` (its paraphrases, saying the target)
and ``gen_neighbourhood`` (its neighbour prompts, still saying their own answers).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evaluation.metrics import GENERATED_TOKENS, generate_greedy, says_answer
from storage.edits import MetricValue
from storage.models import Correction, Phase


def said(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corrections: Sequence[Correction]
) -> dict[int, dict[str, float]]:
    """Per correction id: its ``gen_*`` shares, from one batched greedy decode of all its prompts."""
    prompts: list[str] = []
    expected: list[tuple[int, str, str]] = []  # (correction id, metric, answer) per prompt
    for c in corrections:
        prompts.append(c.filled_prompt())
        expected.append((c.id, "gen_efficacy", c.target))
        for paraphrase in c.paraphrases:
            prompts.append(paraphrase)
            expected.append((c.id, "gen_paraphrase", c.target))
        for neighbour in c.neighbors:
            prompts.append(neighbour["prompt"])
            expected.append((c.id, "gen_neighbourhood", neighbour["answer"]))
    texts = generate_greedy(model, tokenizer, prompts, GENERATED_TOKENS) if prompts else []
    hits: dict[int, dict[str, list[bool]]] = {}
    for (correction_id, name, answer), text in zip(expected, texts, strict=True):
        hits.setdefault(correction_id, {}).setdefault(name, []).append(says_answer(text, answer))
    return {i: {name: sum(found) / len(found) for name, found in by_name.items()} for i, by_name in hits.items()}


def generation_metrics(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]]) -> list[MetricValue]:
    """The pre and post ``gen_*`` metrics of the corrections measured after the edit (the applied ones)."""
    values: list[MetricValue] = []
    for correction_id, post in after.items():
        for name, value in before.get(correction_id, {}).items():
            values.append(MetricValue(correction_id, name, Phase.PRE, value))
        values += [MetricValue(correction_id, name, Phase.POST, value) for name, value in post.items()]
    return values
