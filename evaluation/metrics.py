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


@dataclass(frozen=True)
class RecordScores:
    """Total log-probabilities of the new and the true answer on each of a record's prompts."""

    rewrite: tuple[float, float]
    paraphrase: tuple[float, float]
    neighborhood: tuple[float, float]


def score_records(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[CounterFactRecord]
) -> list[RecordScores]:
    prompts: list[str] = []
    answers: list[str] = []
    for r in records:
        for prompt in (r.prompt, r.paraphrase, r.neighborhood):
            prompts += [prompt, prompt]
            answers += [r.target_new, r.target_true]
    flat = completion_scores(model, tokenizer, prompts, answers)
    out = []
    for i in range(len(records)):
        s = flat[6 * i : 6 * i + 6]
        out.append(RecordScores((s[0], s[1]), (s[2], s[3]), (s[4], s[5])))
    return out


def counterfact_metrics(scores: list[RecordScores], before: list[RecordScores] | None = None) -> dict[str, float]:
    """Efficacy, generalisation, specificity (percent), and neighbour log-prob shift if ``before`` is given."""
    n = len(scores)
    metrics = {
        "efficacy": 100.0 * sum(s.rewrite[0] > s.rewrite[1] for s in scores) / n,
        "generalisation": 100.0 * sum(s.paraphrase[0] > s.paraphrase[1] for s in scores) / n,
        "specificity": 100.0 * sum(s.neighborhood[1] > s.neighborhood[0] for s in scores) / n,
    }
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


def generation_metrics(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[CounterFactRecord]
) -> dict[str, float]:
    """``gen_efficacy`` / ``gen_paraphrase``: percent of rewrite / paraphrase prompts whose greedy
    continuation says the new target; ``gen_neighbourhood``: percent of neighbourhood prompts whose
    continuation says their true answer. The teacher-forced figures only compare two answers'
    probabilities; these ask whether the model, left to itself, says the fact."""
    prompts = [p for r in records for p in (r.prompt, r.paraphrase, r.neighborhood)]
    texts = generate_greedy(model, tokenizer, prompts, GENERATED_TOKENS)
    hits = [
        (
            says_answer(texts[3 * i], r.target_new),
            says_answer(texts[3 * i + 1], r.target_new),
            says_answer(texts[3 * i + 2], r.target_true),
        )
        for i, r in enumerate(records)
    ]
    n = len(records)
    return {
        "gen_efficacy": 100.0 * sum(h[0] for h in hits) / n,
        "gen_paraphrase": 100.0 * sum(h[1] for h in hits) / n,
        "gen_neighbourhood": 100.0 * sum(h[2] for h in hits) / n,
    }


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
