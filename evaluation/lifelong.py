"""`metake bench --lifelong`: stream thousands of corrections through a method and watch the model live.

Every ``eval_every`` edits the model as it is then is measured: retention of earlier corrections
(a fixed sample: the first 100, also reported alone, and up to 100 more drawn once with a seed),
efficacy, generalisation and generation-based efficacy of the last window, specificity on a fixed
set of neighbourhood prompts and the median shift of their true answers' log-probabilities from
the unedited model (nats), fluency of greedy continuations of a fixed set of prompts, perplexity
on a fixed text, each edited layer's
``||W - W0|| / ||W0||``, the conditioning of the last layer's accumulated constraint, the share of
each layer's room for edits in use (``Editor.room_used``), the window's
median realised gain, planned norm ``||delta||`` and subject output norm ``||h||`` at the last
layer (a norm feedback between growing weights and growing targets shows in the last two), and
seconds per edit. Each point is one JSON line in ``DIR/curves.jsonl``;
``DIR/*.png`` draws one figure per quantity with every method on the same axes. After each point
the weights and the editor state are saved, so an interrupted run resumes from its last point.
Methods take turns window by window, so a run stopped early still compares them at one length.

Rehearsal (``rehearse_every``): after a point is measured, every correction applied so far is
re-tested (``engine.scoring.targets_said``) and the ones the model no longer says are applied
again, in batches of the stream's size, before the next window. The point is measured before its
rehearsal, so each curve shows the model at the worst of its cycle, never right after a repair.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.editor import EditFailed, Editor
from engine.files import atomic_path, atomic_write_text
from engine.hparams import EditHyperParams
from engine.models import LoadedModel
from engine.scoring import targets_said
from engine.state import EditorState
from evaluation.bench import weight_growth
from evaluation.counterfact import CounterFactRecord
from evaluation.metrics import (
    RecordScores,
    counterfact_metrics,
    fluency,
    generation_hits,
    generation_metrics,
    perplexity,
    score_records,
)

UNEDITED = "unedited"
"""The method name of the reference point measured once before any edit."""
RETENTION_FIRST = 100
RETENTION_MORE = 100
NEIGHBOURHOOD_SET = 100

PLOTTED = {
    "retention": "retention of earlier corrections (%)",
    "retention_first": "retention of the first 100 corrections (%)",
    "retention_says": "earlier corrections the model says (greedy, %)",
    "retention_first_says": "first 100 corrections the model says (greedy, %)",
    "said_at_edit": "corrections of the window said right after their batch (%)",
    "window_efficacy": "efficacy of the last window (%)",
    "window_generalisation": "generalisation of the last window (%)",
    "window_gen_efficacy": "generation-based efficacy of the last window (%)",
    "specificity": "specificity on a fixed neighbourhood set (%)",
    "neighbour_shift": "median |shift| of the neighbourhood set's true-answer log-prob (nats)",
    "fluency": "fluency of greedy continuations (MEMIT's n-gram entropy)",
    "perplexity": "perplexity on a fixed text",
    "max_norm_growth": "largest ||W - W0|| / ||W0|| over the edited layers",
    "log10_condition": "log10 condition number of the last layer's C_prev + alpha I",
    "max_room_used": "largest share of a layer's room for edits in use (pinned / kept directions)",
    "median_gain": "median realised gain of the window",
    "median_plan_norm": "median ||delta|| planned at the last layer (window)",
    "median_subject_norm": "median ||h||, the subject's output at the last layer (window)",
    "s_per_edit": "seconds per edit (window median)",
    "rehearsal_unsaid": "applied corrections not said at a rehearsal, before it (%)",
}


def retention_sample(n_records: int, seed: int = 0) -> list[int]:
    """Indices re-tested at every point: the first 100 and up to 100 more, drawn once."""
    first = list(range(min(RETENTION_FIRST, n_records)))
    rest = list(range(len(first), n_records))
    return first + sorted(random.Random(seed).sample(rest, min(RETENTION_MORE, len(rest))))


def run_lifelong(
    loaded: LoadedModel,
    hparams: dict[str, EditHyperParams],
    records: list[CounterFactRecord],
    batch_size: int,
    eval_every: int,
    out: Path,
    stats_dir: Path | None,
    texts: list[str],
    progress: bool = True,
    rekey_every: int = 0,
    fluency_n: int = 0,
    rehearse_every: int = 0,
) -> list[dict[str, Any]]:
    """Run every method in ``hparams`` over ``records`` (resuming what ``out`` holds); returns all points.

    ``rekey_every``: after each point that reaches a multiple of it, rebuild every method's
    accumulated constraint from the keys its applied corrections have on the model then
    (``Editor.rekey``; 0: never). ``fluency_n``: the first this many records' rewrite prompts
    are continued greedily at every point for the fluency figure (0: no fluency).
    ``rehearse_every``: after each point that reaches a multiple of it, apply again the earlier
    corrections the model no longer says (0: never; see the module's docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    curves = out / "curves.jsonl"
    editors = {method: Editor(loaded, hp, stats_dir) for method, hp in hparams.items()}
    base = next(iter(editors.values())).edited_weights()
    neighbours = records[:NEIGHBOURHOOD_SET]
    stream = _Stream(
        records,
        batch_size,
        eval_every,
        retention_sample(len(records)),
        Locality.of_unedited(loaded, neighbours, [r.prompt for r in records[:fluency_n]], texts),
        base,
    )
    if not any(p.get("method") == UNEDITED for p in _read_points(curves)):
        with curves.open("a") as handle:
            handle.write(json.dumps(_measure_unedited(loaded, stream)) + "\n")
    runs = {}
    for method, editor in editors.items():
        editor.load_weights(base)
        done, state, failed, rehearsed = _resume(out, method, editor, records)
        runs[method] = _Run(done, state, editor.edited_weights(), failed, rehearsed)
    _trim(curves, {method: run.done for method, run in runs.items()})
    bars = {
        m: tqdm(total=len(records), initial=r.done, desc=f"{m} lifelong", disable=not progress) for m, r in runs.items()
    }
    # The methods take turns, one evaluation window each, the one furthest behind first, so that
    # an interrupted run leaves every method's curve at (nearly) the same length.
    while any(run.done < len(records) for run in runs.values()):
        method, run = min(runs.items(), key=lambda item: item[1].done)
        editor = editors[method]
        editor.load_weights(run.weights)
        before = run.done
        point = _window(loaded, editor, run, stream, bars[method]) | {"method": method}
        if rehearse_every and run.done // rehearse_every > before // rehearse_every:
            point |= _rehearse(editor, run, records, stream.batch_size)
        if rekey_every and run.done // rekey_every > before // rekey_every:
            run.state = editor.rekey(run.state, [records[i].request() for i in run.applied()])
            point["rekeyed"] = True
        with curves.open("a") as handle:
            handle.write(json.dumps(point) + "\n")
        run.weights = editor.edited_weights()
        _save(out, method, editor, run)
    for bar in bars.values():
        bar.close()
    next(iter(editors.values())).load_weights(base)
    points = _read_points(curves)
    draw_curves(points, out)
    return points


def _read_points(curves: Path) -> list[dict[str, Any]]:
    """A run's points so far; none before its first point is written."""
    return read_curves(curves) if curves.exists() else []


def read_curves(curves: Path) -> list[dict[str, Any]]:
    """Every point of a curve file (``curves.jsonl``), in the order written; a missing file raises."""
    return [json.loads(line) for line in curves.read_text().splitlines() if line.strip()]


def _measure_unedited(loaded: LoadedModel, stream: _Stream) -> dict[str, Any]:
    """The reference every curve is read against: the model before any edit (``edits`` 0)."""
    return {"method": UNEDITED, "edits": 0, **stream.locality.measure(loaded), "max_norm_growth": 0.0}


@dataclass(frozen=True)
class Locality:
    """What a point measures of the model outside the corrections, against the unedited model:
    specificity and the neighbour log-prob shift on fixed neighbourhood prompts, fluency of greedy
    continuations of fixed prompts, perplexity on a fixed text (each only where its set is given)."""

    neighbours: list[CounterFactRecord]
    unedited: list[RecordScores]
    """The neighbourhood prompts' scores on the model before any edit (the shift's reference)."""
    fluency_prompts: list[str]
    texts: list[str]

    @classmethod
    def of_unedited(
        cls, loaded: LoadedModel, neighbours: list[CounterFactRecord], fluency_prompts: list[str], texts: list[str]
    ) -> Locality:
        """The sets, with the reference scores taken from ``loaded`` as it is now (unedited)."""
        return cls(neighbours, _neighbour_scores(loaded.model, loaded.tokenizer, neighbours), fluency_prompts, texts)

    def measure(self, loaded: LoadedModel) -> dict[str, float | None]:
        model, tokenizer = loaded.model, loaded.tokenizer
        scores = _neighbour_scores(model, tokenizer, self.neighbours)
        metrics = counterfact_metrics(scores, self.unedited) if scores else {}
        return {
            "specificity": metrics.get("specificity"),
            "neighbour_shift": metrics.get("neighbor_logprob_shift"),
            "fluency": fluency(model, tokenizer, self.fluency_prompts) if self.fluency_prompts else None,
            "perplexity": perplexity(model, tokenizer, self.texts) if self.texts else None,
        }


def _neighbour_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[CounterFactRecord]
) -> list[RecordScores]:
    return score_records(model, tokenizer, records, ("neighborhood",)) if records else []


@dataclass(frozen=True)
class _Stream:
    """What every method sees: the records, the batching and the fixed evaluation sets."""

    records: list[CounterFactRecord]
    batch_size: int
    eval_every: int
    sample: list[int]
    locality: Locality
    base: dict[str, torch.Tensor]


@dataclass
class _Run:
    """One method's place in the stream: edits done, its editor state and its edited weights."""

    done: int
    state: EditorState
    weights: dict[str, torch.Tensor]
    failed: list[int] = field(default_factory=list)
    """Indices of the records the state does not hold: refused, or in a batch that failed (rolled back)."""
    rehearsed: list[int] = field(default_factory=list)
    """Indices of the records applied again by rehearsal, in order (one may appear more than once)."""

    def held(self) -> list[int]:
        """The records done so far that the state holds (all but the failed ones), once each."""
        failed = set(self.failed)
        return [i for i in range(self.done) if i not in failed]

    def applied(self) -> list[int]:
        """Every record the state has applied, a rehearsed one once more for each rehearsal."""
        return self.held() + self.rehearsed


def _rehearse(editor: Editor, run: _Run, records: list[CounterFactRecord], batch_size: int) -> dict[str, Any]:
    """Apply again (editing ``run`` in place) the corrections applied so far that greedy decoding
    no longer begins with; returns the point's rehearsal figures."""
    began = time.perf_counter()
    held = run.held()
    loaded = editor.loaded
    said = targets_said(loaded.model, loaded.tokenizer, [records[i].request() for i in held])
    unsaid = [i for i, s in zip(held, said, strict=True) if not s]
    again: list[int] = []
    for start in range(0, len(unsaid), batch_size):
        chosen = unsaid[start : start + batch_size]
        try:
            outcome = editor.apply([records[i].request() for i in chosen], run.state)
        except EditFailed:  # rolled back: these stay as they are until the next rehearsal
            continue
        run.state = outcome.state
        again += chosen  # accepted once, so never refused now (a refusal depends on the request alone)
    run.rehearsed += again
    return {
        "rehearsal_unsaid": 100.0 * len(unsaid) / len(held) if held else None,
        "rehearsed": len(again),
        "rehearsed_total": len(run.rehearsed),
        "rehearsal_seconds": time.perf_counter() - began,
    }


def _window(loaded: LoadedModel, editor: Editor, run: _Run, stream: _Stream, bar: Any) -> dict[str, Any]:
    """Apply records up to the next evaluation point (editing ``run`` in place) and measure there."""
    seconds: list[float] = []
    gains: list[float] = []
    planned: list[float] = []
    subjects: list[float] = []
    said: list[bool] = []
    while True:
        batch = stream.records[run.done : run.done + stream.batch_size]
        began = time.perf_counter()
        try:
            outcome = editor.apply([r.request() for r in batch], run.state)
            run.state = outcome.state
            refused = {request.key for request, _ in outcome.rejected}
            run.failed += [run.done + j for j, r in enumerate(batch) if r.request().key in refused]
            gains += [d.realised_gain for d in outcome.applied]
            planned += [d.planned_norm for d in outcome.applied]
            subjects += [d.planned_norm / d.plan_ratio for d in outcome.applied if d.plan_ratio > 0]
            said += [d.says for d in outcome.applied]
        except EditFailed:  # counted as not retained: the records stay unedited
            run.failed += list(range(run.done, run.done + len(batch)))
        seconds.append((time.perf_counter() - began) / len(batch))
        run.done += len(batch)
        bar.update(len(batch))
        if run.done % stream.eval_every < stream.batch_size or run.done == len(stream.records):
            break
    return _measure(loaded, editor, run.state, run.done, stream) | {
        "edits": run.done,
        "median_gain": statistics.median(gains) if gains else None,
        "median_plan_norm": statistics.median(planned) if planned else None,
        "median_subject_norm": statistics.median(subjects) if subjects else None,
        "said_at_edit": 100.0 * sum(said) / len(said) if said else None,
        "s_per_edit": statistics.median(seconds),
    }


def _measure(loaded: LoadedModel, editor: Editor, state: EditorState, done: int, stream: _Stream) -> dict[str, Any]:
    model, tokenizer = loaded.model, loaded.tokenizer
    # Each set is scored on the prompts its figures read, and nothing else: a point re-tests
    # hundreds of records, and scoring every prompt of each took twice as long.
    earlier = [stream.records[i] for i in stream.sample if i < done]
    earlier_scores = score_records(model, tokenizer, earlier, ("rewrite",)) if earlier else []
    first = earlier_scores[: min(done, RETENTION_FIRST)]
    said = generation_hits(model, tokenizer, earlier, ("rewrite",))["rewrite"] if earlier else []
    said_first = said[: min(done, RETENTION_FIRST)]
    window = stream.records[max(0, done - stream.eval_every) : done]
    window_metrics = counterfact_metrics(score_records(model, tokenizer, window, ("rewrite", "paraphrase")))
    growth = {str(layer): value for layer, value in weight_growth(loaded, stream.base, editor.hparams.layers).items()}
    last = editor.hparams.last_layer
    constraint = state.constraints[last].double() + editor.hparams.solver.alpha * torch.eye(
        state.constraints[last].shape[0], dtype=torch.float64, device=state.constraints[last].device
    )
    eigenvalues = torch.linalg.eigvalsh(constraint)
    condition = float(eigenvalues.max() / eigenvalues.min().clamp(min=1e-300))
    room = {str(layer): value for layer, value in editor.room_used(state).items()}
    return {
        "retention": counterfact_metrics(earlier_scores)["efficacy"] if earlier else None,
        "retention_first": counterfact_metrics(first)["efficacy"] if first else None,
        "retention_says": 100.0 * sum(said) / len(said) if said else None,
        "retention_first_says": 100.0 * sum(said_first) / len(said_first) if said_first else None,
        "retention_tested": len(earlier),
        "window_efficacy": window_metrics["efficacy"],
        "window_generalisation": window_metrics["generalisation"],
        "window_gen_efficacy": generation_metrics(model, tokenizer, window, ("rewrite",))["gen_efficacy"],
        **stream.locality.measure(loaded),
        "norm_growth": growth,
        "max_norm_growth": max(growth.values()),
        "log10_condition": float(torch.log10(torch.tensor(condition))),
        "room_used": room,
        "max_room_used": max(room.values()),
    }


def _meta_path(out: Path, method: str) -> Path:
    return out / f"resume-{method}.json"


def _save(out: Path, method: str, editor: Editor, run: _Run) -> None:
    """Weights and state under names of their own, then the meta that points at them (renamed into
    place last): a kill at any moment leaves the previous point whole."""
    weights, state_path = f"resume-{method}-{run.done}-weights.safetensors", f"resume-{method}-{run.done}-state"
    with atomic_path(out / weights) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in editor.edited_weights().items()}, tmp)
    run.state.save(out / state_path)
    meta = _meta_path(out, method)
    previous = json.loads(meta.read_text()) if meta.exists() else {}
    saved = {"edits": run.done, "weights": weights, "state": state_path, "failed": run.failed}
    atomic_write_text(meta, json.dumps(saved | ({"rehearsed": run.rehearsed} if run.rehearsed else {})))
    for name in (previous.get("weights"), previous.get("state")):
        if name and name not in (weights, state_path):
            (out / name).unlink(missing_ok=True)


def _resume(
    out: Path, method: str, editor: Editor, records: list[CounterFactRecord]
) -> tuple[int, EditorState, list[int], list[int]]:
    """Where a method left off: (edits done, its state, the records that failed, the records
    rehearsal applied again), weights loaded; (0, a fresh state, none, none) otherwise.

    A meta saved before it listed the failed records gets them derived: the records up to its
    point that the editor refuses (deterministic: the request, the tokenizer and the state's
    prefixes decide), provided the state holds exactly the rest; a batch that failed and was
    rolled back cannot be derived, and such a meta is refused with a clear error."""
    meta = _meta_path(out, method)
    if not meta.exists():
        return 0, editor.new_state(), [], []
    saved = json.loads(meta.read_text())
    state = EditorState.load(out / saved["state"], editor.loaded.device)
    editor.check_state(state)
    editor.load_weights({k: v.to(editor.loaded.device) for k, v in load_file(out / saved["weights"]).items()})
    done = int(saved["edits"])
    if "failed" in saved:
        return done, state, list(saved["failed"]), list(saved.get("rehearsed", []))
    refused = [i for i, r in enumerate(records[:done]) if editor.refusal(r.request(), state) is not None]
    if done - len(refused) != state.edits:
        raise ValueError(
            f"{meta} does not list its failed records, and they cannot be derived: {done} records, "
            f"{len(refused)} refused, but the state applied {state.edits}"
        )
    return done, state, refused, []


def _trim(curves: Path, done: dict[str, int]) -> None:
    """Drop points measured after a method's last saved state (killed between the two): the
    resumed run measures them again."""
    points = _read_points(curves)
    kept = [p for p in points if p["method"] not in done or p["edits"] <= done[p["method"]]]
    if len(kept) < len(points):
        atomic_write_text(curves, "".join(json.dumps(p) + "\n" for p in kept))


def draw_curves(points: list[dict[str, Any]], out: Path, keys: tuple[str, ...] = tuple(PLOTTED)) -> list[Path]:
    """One PNG per quantity (those of ``keys``), every method on the same axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = sorted({p["method"] for p in points} - {UNEDITED})
    reference = next((p for p in points if p["method"] == UNEDITED), {})
    for key in keys:
        label = PLOTTED[key]
        figure, axis = plt.subplots(figsize=(7, 3.5))
        drawn = False
        if reference.get(key) is not None and key != "max_norm_growth":
            axis.axhline(reference[key], color="#777", linestyle="--", linewidth=1, label=UNEDITED)
        for method in methods:
            mine = sorted((p["edits"], p[key]) for p in points if p["method"] == method and p.get(key) is not None)
            if mine:
                axis.plot([e for e, _ in mine], [v for _, v in mine], marker=".", label=method)
                drawn = True
        if drawn:
            axis.set_xlabel("corrections applied")
            axis.set_ylabel(label, fontsize=8)
            axis.legend()
            path = out / f"{key}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            written.append(path)
        plt.close(figure)
    return written


TABLE_COLUMNS = (
    ("retention", "retained %", "{:.1f}"),
    ("retention_first", "first 100 %", "{:.1f}"),
    ("retention_says", "retained says %", "{:.1f}"),
    ("retention_first_says", "first 100 says %", "{:.1f}"),
    ("window_efficacy", "eff %", "{:.0f}"),
    ("window_generalisation", "gen %", "{:.0f}"),
    ("window_gen_efficacy", "says %", "{:.0f}"),
    ("said_at_edit", "said at edit %", "{:.0f}"),
    ("specificity", "spec %", "{:.0f}"),
    ("neighbour_shift", "nbr shift", "{:.3f}"),
    ("fluency", "fluency", "{:.1f}"),
    ("perplexity", "ppl", "{:.2f}"),
    ("max_norm_growth", "max dW/W", "{:.3f}"),
    ("log10_condition", "log10 cond", "{:.2f}"),
    ("max_room_used", "room used", "{:.2f}"),
    ("median_gain", "gain", "{:.2f}"),
    ("median_plan_norm", "plan norm", "{:.1f}"),
    ("median_subject_norm", "h norm", "{:.1f}"),
    ("s_per_edit", "s/edit", "{:.2f}"),
    ("rehearsal_unsaid", "unsaid at rehearsal %", "{:.1f}"),
    ("rehearsed_total", "rehearsed", "{:d}"),
)


def summary_table(points: list[dict[str, Any]]) -> str:
    """A Markdown table of every method at the furthest point all of them reached, under the
    unedited reference (the window figures are of the last ``eval_every`` corrections)."""
    methods = sorted({p["method"] for p in points} - {UNEDITED})
    if not methods:
        return "no points yet"
    reached = min(max(p["edits"] for p in points if p["method"] == m) for m in methods)
    return points_table(points, (reached,))


def points_table(points: list[dict[str, Any]], at: tuple[int, ...]) -> str:
    """A Markdown table of the unedited reference and every method's points at ``at`` edits
    (method by method, a point missing from a curve left out)."""
    methods = sorted({p["method"] for p in points} - {UNEDITED})
    rows = [p for p in points if p["method"] == UNEDITED][:1]
    by_point = {(p["method"], p["edits"]): p for p in reversed(points)}  # the first of a point measured twice
    rows += [by_point[(m, edits)] for m in methods for edits in at if (m, edits) in by_point]
    # a column no row measured (a curve older than the figure) is left out
    columns = [c for c in TABLE_COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    header = ["method", "edits", *(label for _, label, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], str(row["edits"])]
        cells += [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
