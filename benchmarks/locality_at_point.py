"""The lifelong points' locality figures, measured on saved edited weights after the fact.

Curves recorded before the lifelong benchmark measured the neighbour log-prob shift and fluency
lack them; this puts saved points (``RUN/resume-METHOD-N-weights.safetensors``) through the same
``evaluation.lifelong.Locality`` a point uses now, against the unedited model, in one process:
the stream's first 100 records' neighbourhood prompts, the first ``--fluency-n`` records' rewrite
prompts, and perplexity on the text the curves used (a check that the weights are the point's).

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/locality_at_point.py \\
        --data ../shared/data/counterfact/easyedit_counterfact-train.json --offset 2000 \\
        --ppl-text ../shared/data/corpus/wikitext-2_valid.tokens.txt --threads 1 \\
        --weights metake@2000=/work/runs/metake/resume-metake-2000-weights.safetensors \\
        --out benchmarks/results/locality-train2000-at2000.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.editor import restore_weights, snapshot_weights
from engine.hparams import EditHyperParams
from engine.models import load_model
from evaluation.counterfact import load_counterfact
from evaluation.lifelong import NEIGHBOURHOOD_SET, Locality
from storage.home import resolve_home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--offset", type=int, required=True, help="the lifelong run's --offset")
    parser.add_argument("--fluency-n", type=int, default=50)
    parser.add_argument("--ppl-text", type=Path, required=True)
    parser.add_argument("--ppl-chars", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", action="append", default=[], metavar="LABEL=FILE", help="a saved point's weights")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir)
    layers = EditHyperParams.resolve(loaded.model_type, loaded.n_layers, None).layers
    records = load_counterfact(args.data, max(NEIGHBOURHOOD_SET, args.fluency_n), args.offset)
    texts = [args.ppl_text.read_text(errors="replace")[: args.ppl_chars]]
    unedited = snapshot_weights(loaded, layers)
    started = time.perf_counter()
    locality = Locality.of_unedited(
        loaded, records[:NEIGHBOURHOOD_SET], [r.prompt for r in records[: args.fluency_n]], texts
    )
    rows = {"unedited": locality.measure(loaded)}
    for item in args.weights:
        label, _, file = item.partition("=")
        restore_weights(loaded, layers, load_file(file))
        rows[label] = locality.measure(loaded)
        restore_weights(loaded, layers, unedited)
        print(label, json.dumps(rows[label]), file=sys.stderr)
    result = {
        "command": sys.argv,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
        "layers": list(layers),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for label, row in rows.items():
        print(label, " ".join(f"{k}={v:.3f}" for k, v in row.items() if v is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
