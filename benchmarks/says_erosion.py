"""What an earlier correction the model no longer says says instead, on saved lifelong points.

A lifelong point's teacher-forced retention asks only whether the new answer outscores the old;
``retention_says`` asks whether greedy decoding from the rewrite prompt starts with it. This puts
saved points (``RUN/resume-METHOD-N-weights.safetensors``) through the same retention sample the
run re-tests (``evaluation.lifelong.retention_sample`` over the stream's records) and sorts each
correction edited before the point into: said; says the old answer again (reverted); neither, but
the new answer still wins teacher-forced; neither, and lost. It also gives the median
log-probability margin of the new answer over the old (nats, whole answers) in each group, and
the same for the unedited model on the furthest point's sample (its "reverted" share: how often
it says the true answer).

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/says_erosion.py \\
        --data ../shared/data/counterfact/easyedit_counterfact-train.json --offset 2000 --n 2000 \\
        --threads 2 --weights plain@400=/work/runs/long/plain/resume-metake-400-weights.safetensors \\
        --weights passes3@1000=/work/runs/long/passes3/resume-metake-1000-weights.safetensors \\
        --out benchmarks/results/says-erosion-train2000.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.editor import restore_weights
from engine.hparams import EditHyperParams
from engine.models import LoadedModel, load_model
from evaluation.counterfact import CounterFactRecord, load_counterfact
from evaluation.lifelong import retention_sample
from evaluation.metrics import GENERATED_TOKENS, generate_greedy, says_answer, score_records
from storage.home import resolve_home


def erosion(loaded: LoadedModel, records: list[CounterFactRecord], edits: int) -> dict[str, object]:
    """The sample's corrections edited before ``edits``, sorted by what the model says of them."""
    sample = [records[i] for i in retention_sample(len(records)) if i < edits]
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = generate_greedy(model, tokenizer, [r.prompt for r in sample], GENERATED_TOKENS)
    margins = [new - old for new, old in (s.rewrite for s in score_records(model, tokenizer, sample, ("rewrite",)))]
    groups: dict[str, list[float]] = {"said": [], "reverted": [], "unsaid_retained": [], "other": []}
    examples = []
    for record, text, margin in zip(sample, texts, margins, strict=True):
        if says_answer(text, record.target_new):
            group = "said"
        elif says_answer(text, record.target_true):
            group = "reverted"
        else:
            group = "unsaid_retained" if margin > 0 else "other"
        groups[group].append(margin)
        if group != "said" and len(examples) < 12:
            example = {"prompt": record.prompt, "new": record.target_new, "old": record.target_true, "says": text}
            examples.append(example)
    n = len(sample)
    return {
        "tested": n,
        "percent": {g: 100.0 * len(m) / n for g, m in groups.items()},
        "median_margin": {g: statistics.median(m) if m else None for g, m in groups.items()},
        "examples": examples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--offset", type=int, required=True, help="the lifelong run's --offset")
    parser.add_argument("--n", type=int, required=True, help="the lifelong run's --n (the sample is drawn over it)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", action="append", default=[], metavar="LABEL@EDITS=FILE", help="a saved point")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model("default", cache_dir=resolve_home(None).models_dir)
    layers = EditHyperParams.resolve(loaded.model_type, loaded.n_layers, None).layers
    records = load_counterfact(args.data, args.n, args.offset)
    started = time.perf_counter()
    # the unedited model on the same sample: how often it says the true answer is the ceiling a
    # "says" figure can be read against (its "reverted" share)
    split = [w.partition("=") for w in args.weights]
    points = [(label, int(label.rpartition("@")[2]), file) for label, _, file in split]
    furthest = max(edits for _, edits, _ in points)
    rows = {f"unedited@{furthest}": erosion(loaded, records, furthest)}
    for label, edits, file in points:
        restore_weights(loaded, layers, load_file(file))
        rows[label] = erosion(loaded, records, edits)
    for label, row in rows.items():
        print(label, json.dumps(row["percent"]), json.dumps(row["median_margin"]))
    result = {"command": sys.argv, "threads": torch.get_num_threads(), "seconds": time.perf_counter() - started}
    args.out.write_text(json.dumps(result | {"layers": list(layers), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
