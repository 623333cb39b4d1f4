"""Tune every method with the same budget on the validation split, and write the chosen hparams.

The protocol (docs/engine.md, "Evaluation protocol"): each method gets the same number of
configurations (``GRID``: its shipped defaults and three variations of the knobs the field tunes
for it), each run on the same first ``--n`` records of the CounterFact *validation* split, single
edits in sequence; the configuration with the best edit score (harmonic mean of efficacy,
generalisation and specificity; ties to the smaller neighbourhood shift) is written to
``benchmarks/hparams/<method>.toml``. Reported tables use train records from 1,000 on, which no
tuning ever saw. Every trial is logged to ``benchmarks/results/tuning.json``.

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/tune_methods.py \\
        --data ../shared/data/counterfact/easyedit_counterfact-val.json --n 30
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from engine.hparams import EditHyperParams
from engine.models import load_model
from evaluation.bench import run_benchmark
from evaluation.counterfact import load_counterfact
from storage.home import resolve_home

HERE = Path(__file__).resolve().parent

GRID: dict[str, list[dict[str, Any]]] = {
    "metake": [
        {},
        {"outer": {"gamma": 200.0}},
        {"outer": {"safety_clamp_factor": 0.75}},
        {"outer": {"lr_zero_start": 0.3}},
    ],
    "alphaedit": [
        {},
        {"upstream": {"clamp_norm_factor": 1.0}},
        {"upstream": {"clamp_norm_factor": 1.5}},
        {"solver": {"alpha": 1.0}},
    ],
    "memit": [
        {},
        {"solver": {"mom2_weight": 5000.0}},
        {"solver": {"mom2_weight": 1600.0}},
        {"solver": {"mom2_weight": 500.0}},
    ],
}
"""Four configurations per method: the defaults first, then one knob changed at a time."""


def without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple | list):
        return [without_none(v) for v in value]
    return value


def write_hparams(path: Path, hp: EditHyperParams, note: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {note}\n" + tomli_w.dumps(without_none(hp.to_dict())))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the CounterFact validation split")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--methods", default="metake,alphaedit,memit")
    parser.add_argument("--out", type=Path, default=HERE / "hparams")
    parser.add_argument("--log", type=Path, default=HERE / "results" / "tuning.json")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)

    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir, device=args.device)
    base = EditHyperParams.defaults_for(loaded.model_type)
    records = load_counterfact(args.data, args.n)
    trials: list[dict[str, Any]] = []
    for method in args.methods.split(","):
        best: tuple[tuple[float, float], EditHyperParams, dict[str, Any]] | None = None
        for changes in GRID[method]:
            hp = base.with_changes(method=method, **changes)
            started = time.perf_counter()
            results = run_benchmark(loaded, hp, records, [method], 1, home.stats_dir, [], fluency_n=0, progress=False)
            summary = results[-1].summary()
            trial = {
                "method": method,
                "changes": changes,
                "summary": summary,
                "unedited": results[0].summary(),
                "seconds": round(time.perf_counter() - started, 1),
            }
            trials.append(trial)
            print(json.dumps(trial), flush=True)
            rank = (summary["score"], -summary.get("neighbor_logprob_shift", 0.0))
            if best is None or rank > best[0]:
                best = (rank, hp, changes)
        assert best is not None
        note = (
            f"{method} tuned by benchmarks/tune_methods.py on the first {len(records)} records of {args.data.name}: "
            f"chosen {json.dumps(best[2]) or 'defaults'} (edit score {best[0][0]:.2f}) of {len(GRID[method])}"
        )
        write_hparams(args.out / f"{method}.toml", best[1], note)
        print(note, flush=True)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text(json.dumps({"data": args.data.name, "n": len(records), "trials": trials}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
