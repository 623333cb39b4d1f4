"""CounterFact metrics (MEMIT/AlphaEdit definitions) and the continuous figures beside them.

Binary specificity is blunt on a small model, so next to efficacy, generalisation, specificity
and fluency this module reports continuous figures: the shift of neighbour prompts' true-answer
log-probability, perplexity on a fixed text, and (in the benchmark) relative weight change.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from statistics import median

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.requests import Row, make_batch
from engine.scoring import completion_scores
from evaluation.counterfact import CounterFactRecord

PARTS = ("rewrite", "paraphrase", "neighborhood")
"""A CounterFact record's kinds of prompt; each metric reads one of them (efficacy the rewrite,
generalisation the paraphrase, specificity the neighbourhood prompt)."""
METRIC_OF = {"rewrite": "efficacy", "paraphrase": "generalisation", "neighborhood": "specificity"}


@dataclass(frozen=True)
class RecordScores:
    """Total log-probabilities of the new and the true answer on each of a record's prompts
    (``None`` for a kind of prompt that was not scored)."""

    rewrite: tuple[float, float] | None = None
    paraphrase: tuple[float, float] | None = None
    neighborhood: tuple[float, float] | None = None


def _prompts(record: CounterFactRecord, parts: tuple[str, ...]) -> list[str]:
    by_part = {"rewrite": record.prompt, "paraphrase": record.paraphrase, "neighborhood": record.neighborhood}
    return [by_part[part] for part in parts]


def _check_parts(parts: tuple[str, ...]) -> None:
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"unknown or no prompt kinds {sorted(unknown)}; choose from {PARTS}")


def score_records(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[CounterFactRecord],
    parts: tuple[str, ...] = PARTS,
) -> list[RecordScores]:
    """Score the ``parts`` of each record (all three by default): a caller that reads one metric
    scores a third of the prompts (the lifelong benchmark re-tests hundreds at every point)."""
    _check_parts(parts)
    prompts: list[str] = []
    answers: list[str] = []
    for r in records:
        for prompt in _prompts(r, parts):
            prompts += [prompt, prompt]
            answers += [r.target_new, r.target_true]
    flat = iter(completion_scores(model, tokenizer, prompts, answers))
    return [RecordScores(**{part: (next(flat), next(flat)) for part in parts}) for _ in records]


def counterfact_metrics(scores: list[RecordScores], before: list[RecordScores] | None = None) -> dict[str, float]:
    """Efficacy, generalisation, specificity (percent) of the kinds of prompt that were scored, and
    the neighbour log-prob shift if ``before`` is given (both with neighbourhood scores)."""
    n = len(scores)
    metrics = {}
    for part, name in METRIC_OF.items():
        pairs = [getattr(s, part) for s in scores]
        if n and all(pair is not None for pair in pairs):
            # A neighbourhood prompt is kept when its true answer still wins; the others need the new one.
            wins = [(pair[1] > pair[0]) if part == "neighborhood" else (pair[0] > pair[1]) for pair in pairs]
            metrics[name] = 100.0 * sum(wins) / n
    if before is not None:
        shifts = [abs(a.neighborhood[1] - b.neighborhood[1]) for a, b in zip(scores, before, strict=True)]
        metrics["neighbor_logprob_shift"] = median(shifts)
    return metrics


def _normalised(text: str) -> str:
    """Case-folded, without leading space and punctuation (generation-based hits, see below)."""
    return re.sub(r"^[\W_]+", "", text.casefold())


def says_answer(generated: str, answer: str) -> bool:
    """Whether a greedy continuation *says* the answer: it starts with it, ignoring case, leading
    space and punctuation, and the answer is not merely the start of a longer word."""
    said, expected = _normalised(generated), _normalised(answer).rstrip(".!?,;: ")
    if not expected or not said.startswith(expected):
        return False
    rest = said[len(expected) :]
    return not rest or not rest[0].isalnum()


GENERATED_TOKENS = 8
"""Greedy tokens generated per prompt for the generation-based metrics (CounterFact answers are short)."""


GENERATION_METRIC_OF = {"rewrite": "gen_efficacy", "paraphrase": "gen_paraphrase", "neighborhood": "gen_neighbourhood"}


def generation_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[CounterFactRecord],
    parts: tuple[str, ...] = PARTS,
) -> dict[str, float]:
    """``gen_efficacy`` / ``gen_paraphrase``: percent of rewrite / paraphrase prompts whose greedy
    continuation says the new target; ``gen_neighbourhood``: percent of neighbourhood prompts whose
    continuation says their true answer (each only for the ``parts`` asked for). The teacher-forced
    figures only compare two answers' probabilities; these ask whether the model, left to itself,
    says the fact."""
    hits = generation_hits(model, tokenizer, records, parts)
    return {GENERATION_METRIC_OF[part]: 100.0 * sum(hits[part]) / len(records) for part in parts}


def generation_hits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[CounterFactRecord],
    parts: tuple[str, ...] = PARTS,
) -> dict[str, list[bool]]:
    """Per part, per record: the hit :func:`generation_metrics` counts."""
    _check_parts(parts)
    prompts = [p for r in records for p in _prompts(r, parts)]
    texts = iter(generate_greedy(model, tokenizer, prompts, GENERATED_TOKENS))
    hits: dict[str, list[bool]] = {part: [] for part in parts}
    for r in records:
        for part in parts:
            answer = r.target_true if part == "neighborhood" else r.target_new
            hits[part].append(says_answer(next(texts), answer))
    return hits


def ngram_entropy(text: str, n: int) -> float:
    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def fluency_of(text: str) -> float:
    """MEMIT's fluency: mean of 2/3 x bigram and 4/3 x trigram entropy (bits), x100."""
    return 100.0 * (2 / 3 * ngram_entropy(text, 2) + 4 / 3 * ngram_entropy(text, 3)) / 2


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int, batch: int = 16
) -> list[str]:
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(prompts), batch):
        enc = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True, padding_side="left")
        out = model.generate(
            **enc.to(device), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
        texts.extend(tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True))
    return texts


def fluency(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 64
) -> float:
    """Mean fluency of greedy continuations of ``prompts``."""
    texts = generate_greedy(model, tokenizer, prompts, max_new_tokens)
    return sum(fluency_of(p + t) for p, t in zip(prompts, texts, strict=True)) / len(texts)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], window: int = 256, batch: int = 2
) -> float:
    """Token-level perplexity of ``texts`` cut into windows of ``window`` tokens."""
    device = next(model.parameters()).device
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    windows = [seq[i : i + window] for seq in ids for i in range(0, len(seq), window) if len(seq[i : i + window]) > 1]
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(windows), batch):
        tokens = make_batch([Row(w) for w in windows[start : start + batch]], pad, device)
        input_ids, mask = tokens.input_ids, tokens.attention_mask
        logits = model(**tokens.inputs(), use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
        keep = mask[:, 1:].bool()
        total -= float(logp[keep].sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("perplexity needs text of at least two tokens")
    return math.exp(total / count)
