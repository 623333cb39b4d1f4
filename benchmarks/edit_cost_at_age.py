"""Does a long life make edits slower? Seconds per edit on a lifelong run's saved point against
the unedited model with a fresh state, side by side in one process.

The same requests (records the run has not reached) are applied, one at a time, alternately to
the old model (its saved weights and editor state, e.g. after 2,000 corrections) and to the
young one (unedited weights, a fresh state); each edit is undone before the next so that every
edit of a side starts from the same point. Prints the median seconds per edit of each side, by
stage, and their ratio:

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/edit_cost_at_age.py --hparams H.toml \\
        --point RUN/resume-alphaedit.json --data ../shared/data/counterfact/easyedit_counterfact-train.json \\
        --offset 4000 --n 6 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.editor import Editor
from engine.hparams import EditHyperParams
from engine.models import load_model
from engine.state import EditorState
from evaluation.counterfact import load_counterfact
from storage.home import resolve_home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", type=Path, required=True)
    parser.add_argument("--point", type=Path, required=True, help="A lifelong run's resume-METHOD.json.")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--offset", type=int, default=4000)
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir)
    editor = Editor(loaded, EditHyperParams.from_file(args.hparams), home.stats_dir)
    meta = json.loads(args.point.read_text())
    sides = {
        "young": (editor.edited_weights(), editor.new_state()),
        "old": (
            {k: v.to(loaded.device) for k, v in load_file(args.point.parent / meta["weights"]).items()},
            EditorState.load(args.point.parent / meta["state"], loaded.device),
        ),
    }
    requests = [r.request() for r in load_counterfact(args.data, n=args.n, offset=args.offset)]
    seconds: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for request in requests:
        for side, (weights, state) in sides.items():
            editor.load_weights(weights)
            seconds[side].append(editor.apply([request], state).seconds)
    stages = list(seconds["young"][0])
    print(f"{len(requests)} edits a side, {meta['edits']} corrections behind the old one; median seconds per edit")
    print("side  | " + " | ".join(stages))
    medians = {side: {s: statistics.median(e[s] for e in runs) for s in stages} for side, runs in seconds.items()}
    for side, values in medians.items():
        print(f"{side:5} | " + " | ".join(f"{values[s]:.2f}" for s in stages))
    print(f"old / young, total: {medians['old']['total'] / medians['young']['total']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
