"""The benchmark: the same CounterFact sequence through each method, on one model, in one process.

Every method starts from the same base weights, edits the same layers with the same batch size
and the same cached statistics, and is scored on the final model after its whole sequence, so
that the only difference between two rows is the method.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from engine.architecture import edited_weight
from engine.editor import EditFailed, Editor, restore_weights, snapshot_weights
from engine.hparams import EditHyperParams, Method
from engine.models import LoadedModel
from evaluation.counterfact import CounterFactRecord
from evaluation.metrics import counterfact_metrics, fluency, generation_metrics, perplexity, score_records
from evaluation.zsre import ZsreRecord, score_zsre, zsre_metrics

Record = CounterFactRecord | ZsreRecord


class PeakMemory:
    """Peak resident memory (and CUDA allocation) while a block runs, sampled every 20 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_rss = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_rss = max(self.peak_rss, self.rss())

    @contextmanager
    def watch(self) -> Iterator[PeakMemory]:
        self.peak_rss = self.rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self._stop.clear()
            self.peak_rss = max(self.peak_rss, self.rss())

    def cuda_peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


@dataclass
class MethodResult:
    method: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds_per_edit: list[float] = field(default_factory=list)
    applied: int = 0
    rejected: int = 0
    failed: int = 0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    realised_gain: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    relative_weight_change: dict[int, float] = field(default_factory=dict)
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Seconds per edit in each stage of ``Editor.apply`` (planning, outer loop, solve, scoring), per batch."""

    def summary(self) -> dict[str, Any]:
        row: dict[str, Any] = {"method": self.method, **{k: round(v, 4) for k, v in self.metrics.items()}}
        if self.seconds_per_edit:
            row["median_s_per_edit"] = round(statistics.median(self.seconds_per_edit), 3)
            row["median_realised_gain"] = (
                round(statistics.median(self.realised_gain), 3) if self.realised_gain else None
            )
            row["median_steps"] = statistics.median(self.steps) if self.steps else None
            row["max_relative_weight_change"] = round(max(self.relative_weight_change.values()), 4)
            row.update(applied=self.applied, rejected=self.rejected, failed=self.failed)
            for stage, values in self.stage_seconds.items():
                row[f"median_s_{stage}"] = round(statistics.median(values), 3)
            row["peak_rss_mb"] = round(self.peak_rss_mb, 1)
            if self.peak_cuda_mb is not None:
                row["peak_cuda_mb"] = round(self.peak_cuda_mb, 1)
        return row


def edit_score(metrics: dict[str, float]) -> float:
    """One number to tune on: the harmonic mean of efficacy, generalisation and specificity (or
    zsRE locality), MEMIT's "score", so that no figure can be bought by giving up another."""
    parts = [metrics["efficacy"], metrics["generalisation"], metrics.get("specificity", metrics.get("locality"))]
    if any(p is None for p in parts):
        raise KeyError("edit_score needs efficacy, generalisation and specificity or locality")
    return 0.0 if min(parts) <= 0 else statistics.harmonic_mean(parts)


def evaluate_model(
    loaded: LoadedModel, records: list[Record], texts: list[str], fluency_n: int, before: list | None
) -> tuple[dict[str, float], list]:
    """The dataset's own metrics (CounterFact or zsRE), fluency and perplexity of the model as it is."""
    if records and isinstance(records[0], ZsreRecord):
        scores: list = score_zsre(loaded.model, loaded.tokenizer, records)  # type: ignore[arg-type]
        metrics = zsre_metrics(scores, before)
    else:
        scores = score_records(loaded.model, loaded.tokenizer, records)  # type: ignore[arg-type]
        metrics = counterfact_metrics(scores, before)
        metrics |= generation_metrics(loaded.model, loaded.tokenizer, records)  # type: ignore[arg-type]
    if before is not None or "specificity" in metrics:
        metrics["score"] = edit_score(metrics)
    if fluency_n:
        metrics["fluency"] = fluency(loaded.model, loaded.tokenizer, [r.prompt for r in records[:fluency_n]])
    if texts:
        metrics["perplexity"] = perplexity(loaded.model, loaded.tokenizer, texts)
    return metrics, scores


def weight_growth(loaded: LoadedModel, base: dict[str, torch.Tensor], layers: Iterable[int]) -> dict[int, float]:
    """``||W - W0|| / ||W0||`` of each edited layer, against the base weights ``base``."""
    growth = {}
    for layer in layers:
        w0 = base[loaded.spec.edited_weight_name(layer)].double()
        w = edited_weight(loaded.model, loaded.spec, layer).detach().double()
        growth[layer] = float((w - w0).norm() / w0.norm())
    return growth


def run_benchmark(
    loaded: LoadedModel,
    hparams: EditHyperParams,
    records: list[Record],
    methods: list[Method],
    batch_size: int,
    stats_dir: Path | None,
    texts: list[str],
    fluency_n: int = 50,
    progress: bool = True,
    method_hparams: dict[str, EditHyperParams] | None = None,
) -> list[MethodResult]:
    """Edit ``records`` in sequence with each method from the same base weights; score each final model.

    ``method_hparams`` gives a method its own (tuned) hyperparameters instead of ``hparams``;
    every method must edit the same layers, so that the base weights restore all of them.
    """
    per_method = {m: (method_hparams or {}).get(m, hparams).with_changes(method=m) for m in methods}
    for method, hp in per_method.items():
        if hp.layers != hparams.layers:
            raise ValueError(f"{method} edits layers {list(hp.layers)}, the benchmark {list(hparams.layers)}")
    base_metrics, base_scores = evaluate_model(loaded, records, texts, fluency_n, None)
    results = [MethodResult("unedited", base_metrics)]
    base_weights = snapshot_weights(loaded, hparams.layers)
    requests = [r.request() for r in records]
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    memory = PeakMemory(loaded.device)
    for method in methods:
        restore_weights(loaded, hparams.layers, base_weights)
        editor = Editor(loaded, per_method[method], stats_dir)
        result = MethodResult(method)
        state = editor.new_state()
        with memory.watch():
            for batch in tqdm(batches, desc=method, disable=not progress, leave=False):
                started = time.perf_counter()
                try:
                    outcome = editor.apply(batch, state)
                except EditFailed:
                    result.failed += len(batch)
                    continue
                result.seconds_per_edit.append((time.perf_counter() - started) / len(batch))
                state = outcome.state
                result.applied += len(outcome.applied)
                result.rejected += len(outcome.rejected)
                result.realised_gain += [d.realised_gain for d in outcome.applied]
                result.steps += [d.upstream_steps + d.outer_steps for d in outcome.applied]
                for stage, seconds in outcome.seconds.items():
                    if stage != "total":
                        result.stage_seconds.setdefault(stage, []).append(seconds / len(batch))
        result.peak_rss_mb = memory.peak_rss / 2**20
        cuda = memory.cuda_peak()
        result.peak_cuda_mb = cuda / 2**20 if cuda is not None else None
        result.relative_weight_change = weight_growth(loaded, base_weights, hparams.layers)
        result.metrics, _ = evaluate_model(loaded, records, texts, fluency_n, base_scores)
        if "perplexity" in base_metrics:
            result.metrics["perplexity_drift"] = result.metrics["perplexity"] - base_metrics["perplexity"]
        results.append(result)
        if progress:
            tqdm.write(f"done: {json.dumps(result.summary())}", file=sys.stderr)
    restore_weights(loaded, hparams.layers, base_weights)
    by_name = {r.method: r for r in results}
    if "alphaedit" in by_name and "metake" in by_name and by_name["alphaedit"].seconds_per_edit:
        ratio = statistics.median(by_name["metake"].seconds_per_edit) / statistics.median(
            by_name["alphaedit"].seconds_per_edit
        )
        by_name["metake"].metrics["time_vs_alphaedit"] = ratio
    return results


COLUMNS = (
    ("method", "method"),
    ("efficacy", "eff"),
    ("generalisation", "gen"),
    ("specificity", "spec"),
    ("gen_efficacy", "g_eff"),
    ("gen_paraphrase", "g_gen"),
    ("gen_neighbourhood", "g_nbr"),
    ("locality", "loc"),
    ("score", "score"),
    ("neighbor_logprob_shift", "nbr_dlogp"),
    ("fluency", "fluency"),
    ("perplexity", "ppl"),
    ("max_relative_weight_change", "max_rel_dW"),
    ("median_realised_gain", "med_g"),
    ("median_steps", "med_steps"),
    ("median_s_per_edit", "s/edit"),
    ("time_vs_alphaedit", "x_alpha"),
    ("peak_rss_mb", "peak_MB"),
    ("applied", "ok"),
    ("rejected", "rej"),
    ("failed", "fail"),
)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the summary rows (blank where a figure does not apply)."""
    present = [(key, label) for key, label in COLUMNS if any(key in row for row in rows)]

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(label for _, label in present) + " |", "|" + "---|" * len(present)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in present) + " |" for row in rows]
    return "\n".join(lines)
