"""zsRE records (the MEND/EasyEdit format) and their metrics, as the zsRE protocol scores them.

A record is a question about a subject (``src``), a new answer (``alt``), a rephrased question,
and an unrelated Natural Questions prompt with its answer (``loc``, ``loc_ans``). The protocol's
figures are token-level top-1 accuracies under teacher forcing: the share of the new answer's
tokens that the model predicts as its most likely next token after the question (efficacy) and
after the rephrase (generalisation), and the share of the locality answer's tokens on which the
edited model's top-1 prediction equals the unedited model's (locality).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.requests import EditRequest, Row, encode_target, make_batch
from engine.scoring import logits_at


@dataclass(frozen=True)
class ZsreRecord:
    case_id: int
    prompt: str
    """The question, subject written out (``src``)."""
    subject: str
    target_new: str
    rephrase: str
    locality_prompt: str
    locality_answer: str

    def request(self) -> EditRequest:
        return EditRequest(
            self.prompt.replace(self.subject, "{}", 1),
            self.subject,
            self.target_new,
            paraphrases=(self.rephrase,),
            key=str(self.case_id),
        )


def is_zsre(raw: list[dict]) -> bool:
    return bool(raw) and {"src", "alt", "rephrase", "loc", "loc_ans"} <= set(raw[0])


def load_zsre(path: str | Path, n: int | None = None, offset: int = 0) -> list[ZsreRecord]:
    """``n`` records from record ``offset`` on (counted in the file) whose subject occurs in the question."""
    with open(path) as handle:
        raw = json.load(handle)
    records = [
        ZsreRecord(offset + i, r["src"], r["subject"], r["alt"], r["rephrase"], r["loc"], r["loc_ans"])
        for i, r in enumerate(raw[offset:])
        if r["subject"] and r["subject"] in r["src"]
    ]
    return records[:n] if n is not None else records


@dataclass(frozen=True)
class ZsreScores:
    """Per record: top-1 hits on the new answer's tokens (rewrite, rephrase) and the locality predictions."""

    rewrite: tuple[bool, ...]
    rephrase: tuple[bool, ...]
    locality: tuple[int, ...]
    """The model's top-1 token at each position of the locality answer (compared before vs after)."""


@torch.no_grad()
def _top1(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 32
) -> list[tuple[list[int], list[int]]]:
    """For each (prompt, answer): the answer's tokens and the model's top-1 prediction at each of them."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [Row(tokenizer(p).input_ids, target=encode_target(tokenizer, p, a)) for p, a in chunk]
        batch = make_batch(rows, pad, device)
        predicted = logits_at(model, batch, batch.target_rows, batch.target_positions).argmax(dim=-1).cpu()
        owners = batch.target_rows.cpu()
        out.extend((rows[i].target, predicted[owners == i].tolist()) for i in range(len(chunk)))
    return out


def score_zsre(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[ZsreRecord]
) -> list[ZsreScores]:
    pairs = []
    for r in records:
        pairs += [(r.prompt, r.target_new), (r.rephrase, r.target_new), (r.locality_prompt, r.locality_answer)]
    flat = _top1(model, tokenizer, pairs)
    scores = []
    for i in range(len(records)):
        (rw_t, rw_p), (rp_t, rp_p), (_, loc_p) = flat[3 * i : 3 * i + 3]
        scores.append(
            ZsreScores(
                tuple(a == b for a, b in zip(rw_t, rw_p, strict=True)),
                tuple(a == b for a, b in zip(rp_t, rp_p, strict=True)),
                tuple(loc_p),
            )
        )
    return scores


def zsre_metrics(scores: list[ZsreScores], before: list[ZsreScores] | None = None) -> dict[str, float]:
    """Efficacy, generalisation and (against ``before``) locality, in percent, averaged over records."""

    def mean_share(hits: list[tuple[bool, ...]]) -> float:
        return 100.0 * sum(sum(h) / len(h) for h in hits) / len(hits)

    metrics = {
        "efficacy": mean_share([s.rewrite for s in scores]),
        "generalisation": mean_share([s.rephrase for s in scores]),
    }
    if before is not None:
        same = [
            tuple(a == b for a, b in zip(s.locality, b0.locality, strict=True))
            for s, b0 in zip(scores, before, strict=True)
        ]
        metrics["locality"] = mean_share(same)
    return metrics
