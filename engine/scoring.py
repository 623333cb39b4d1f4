"""Log-probabilities of chosen tokens, computing the LM head only where it is needed.

The LM head of a small model is a large share of its forward cost (SmolLM2: 49,152 x 576 per
token), and an edit only ever scores a handful of positions. Running the backbone and applying
the output embedding at the selected positions keeps that cost proportional to what is scored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.requests import EditRequest, Row, TokenBatch, encode_target, make_batch


def logits_at(model: PreTrainedModel, batch: TokenBatch, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Next-token logits at ``(rows[i], positions[i])`` (float32)."""
    hidden = model.base_model(**batch.inputs(), use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[rows, positions]).float()


def batch_logits(
    model: PreTrainedModel, batch: TokenBatch, inputs: dict[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at every target position and at every row's last token, from one forward pass.

    ``inputs`` replaces the batch's own forward arguments (a split batch's stepped part and cache).
    """
    forward = inputs if inputs is not None else {**batch.inputs(), "use_cache": False}
    hidden = model.base_model(**forward).last_hidden_state
    head = model.get_output_embeddings()
    at_targets = head(hidden[batch.target_rows, batch.target_positions]).float()
    at_last = head(hidden[batch.rows, batch.last]).float()
    return at_targets, at_last


def target_logprobs(at_targets: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Log-probability of each target token (flat, aligned with ``batch.target_rows``)."""
    return F.log_softmax(at_targets, dim=-1).gather(1, batch.target_tokens[:, None]).squeeze(1)


def per_row_sum(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def targets_are_top(at_targets: torch.Tensor, batch: TokenBatch, margin: float = 0.0) -> torch.Tensor:
    """Per row: is every target token the most likely next token (by ``margin`` nats)?"""
    logp = F.log_softmax(at_targets, dim=-1)
    chosen = logp.gather(1, batch.target_tokens[:, None]).squeeze(1)
    others = logp.scatter(1, batch.target_tokens[:, None], float("-inf")).max(dim=1).values
    ok = (chosen - others > margin).long()
    n = batch.input_ids.shape[0]
    misses = per_row_sum(1 - ok, batch.target_rows, n)
    return misses == 0


def _completion_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    batch_size: int,
) -> Iterator[tuple[TokenBatch, torch.Tensor]]:
    """Per chunk of ``batch_size`` prompts: the batch of each prompt followed by its completion
    and the logits at the completion's tokens (its callers run it under ``torch.no_grad``)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prompts), batch_size):
        chunk = zip(prompts[start : start + batch_size], completions[start : start + batch_size], strict=True)
        rows = [Row(tokenizer(p).input_ids, target=encode_target(tokenizer, p, c)) for p, c in chunk]
        batch = make_batch(rows, pad, device)
        yield batch, logits_at(model, batch, batch.target_rows, batch.target_positions)


@torch.no_grad()
def completion_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 32,
) -> list[list[float]]:
    """Log-probability of each token of ``completions[i]`` after ``prompts[i]``."""
    out: list[list[float]] = []
    for batch, at_targets in _completion_logits(model, tokenizer, prompts, completions, batch_size):
        logp = target_logprobs(at_targets, batch).cpu()
        rows_of = batch.target_rows.cpu()
        out.extend(logp[rows_of == i].tolist() for i in range(batch.input_ids.shape[0]))
    return out


def completion_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    batch_size: int = 32,
) -> list[float]:
    """Total log-probability of each completion (the NLL comparison of CounterFact's metrics)."""
    return [sum(x) for x in completion_logprobs(model, tokenizer, prompts, completions, batch_size)]


@torch.no_grad()
def targets_said(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest], batch_size: int = 32
) -> list[bool]:
    """Per request: does greedy decoding from its prompt begin with its target, i.e. is every target
    token the most likely next token after the prompt and the target tokens before it? (Exact, with
    no normalisation: the strict form of ``gen_efficacy``'s hit.)"""
    texts = [r.text for r in requests]
    said: list[bool] = []
    for batch, at_targets in _completion_logits(model, tokenizer, texts, [r.target for r in requests], batch_size):
        said += targets_are_top(at_targets, batch).tolist()
    return said


HOLDS_WITHOUT_ORIGINAL = 0.5
"""Without a known original answer, a fact holds when P(target | prompt) is above this."""


@dataclass(frozen=True)
class FactScores:
    """How a model answers one request's prompts: the prompt, its paraphrases, its neighbours.

    Efficacy-style figures follow CounterFact: the new target beats the original answer by total
    log-probability (or, without an original, P(target) > 1/2); a neighbour is kept when its own
    answer still beats the request's target.
    """

    target_prob: float
    original_prob: float | None = None
    paraphrase_target_prob: float | None = None
    paraphrase_efficacy: float | None = None
    neighbor_answer_prob: float | None = None
    neighbor_kept: float | None = None

    @property
    def holds(self) -> bool:
        if self.original_prob is not None:
            return self.target_prob > self.original_prob
        return self.target_prob > HOLDS_WITHOUT_ORIGINAL

    def metrics(self) -> dict[str, float]:
        """The figures that apply, by name (efficacy as 0/1)."""
        values = {field.name: getattr(self, field.name) for field in fields(self)}
        return {name: value for name, value in values.items() if value is not None} | {"efficacy": float(self.holds)}


def fact_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[EditRequest]
) -> list[FactScores]:
    """Score every request's prompts in one batched pass (prompt, paraphrases, neighbours)."""
    pairs: list[tuple[str, str]] = []
    for r in requests:
        pairs.append((r.text, r.target))
        if r.original:
            pairs.append((r.text, r.original))
        for paraphrase in r.paraphrases:
            pairs.append((paraphrase, r.target))
            if r.original:
                pairs.append((paraphrase, r.original))
        for prompt, answer in r.neighbors:
            pairs += [(prompt, answer), (prompt, r.target)]
    scores = iter(completion_scores(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs]) if pairs else [])
    out = []
    for r in requests:
        target = next(scores)
        original = next(scores) if r.original else None
        para = [(next(scores), next(scores) if r.original else None) for _ in r.paraphrases]
        neigh = [(next(scores), next(scores)) for _ in r.neighbors]
        out.append(
            FactScores(
                target_prob=math.exp(target),
                original_prob=math.exp(original) if original is not None else None,
                paraphrase_target_prob=_mean([math.exp(t) for t, _ in para]),
                paraphrase_efficacy=_mean([float(t > o) for t, o in para if o is not None]),
                neighbor_answer_prob=_mean([math.exp(a) for a, _ in neigh]),
                neighbor_kept=_mean([float(a > t) for a, t in neigh]),
            )
        )
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
