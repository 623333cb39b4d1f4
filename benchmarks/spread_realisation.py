"""How much of MetaKE's plan the multi-layer spread realises, against what the outer loop planned for.

MetaKE's outer loop optimises the plan ``delta`` under the virtual update of the last critical
layer alone, which realises ``G delta`` at the subject (``G`` its gain). The solve then spreads
``h + delta`` over all the critical layers, and the lower layers realise part of it before the
last one takes the rest, so the edited model can move further than the outer loop found
necessary. Per sequential edit this prints the planned norm ``||delta||``, the virtual
realisation ``||G delta||``, and the actual change of the last critical layer's output at the
subject of the bare prompt, for each hyperparameter file given:

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/spread_realisation.py \\
        --data ../shared/data/counterfact/easyedit_counterfact-val.json --offset 100 --n 20 --threads 2 \\
        benchmarks/hparams/variants/metake-null04.toml benchmarks/hparams/variants/metake-null04-spread-virtual.toml
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from engine.editor import Editor, snapshot_weights
from engine.hparams import EditHyperParams
from engine.models import load_model
from engine.planning import encode_request, plan_chunks, subject_outputs
from evaluation.bench import weight_growth
from evaluation.counterfact import load_counterfact
from storage.home import resolve_home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hparams", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--offset", type=int, default=100)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    home = resolve_home(None)
    requests = [r.request() for r in load_counterfact(args.data, n=args.n, offset=args.offset)]
    for path in args.hparams:
        loaded = load_model("default", cache_dir=home.models_dir)
        hparams = EditHyperParams.from_file(path)
        editor = Editor(loaded, hparams, home.stats_dir)
        original = snapshot_weights(loaded, hparams.layers)
        state = editor.new_state()
        last = hparams.last_layer
        ratios: list[float] = []
        changes: list[float] = []
        print(f"{path.name}: edit, ||delta||, ||G delta||, actual, actual / virtual, actual / plan, max dW/W")
        for i, request in enumerate(requests):
            chunks = plan_chunks(loaded, [encode_request(loaded, request, state.prefixes, 0)], [], 1)
            before = subject_outputs(loaded, chunks, last)
            outcome = editor.apply([request], state)
            state = outcome.state
            after = subject_outputs(loaded, chunks, last)
            diag = outcome.applied[0]
            actual = float((after - before).norm())
            ratios.append(actual / diag.realised_norm)
            changes.append(max(outcome.relative_weight_change.values()))
            print(
                f"  {i:3d} {diag.planned_norm:8.2f} {diag.realised_norm:8.2f} {actual:8.2f}"
                f" {ratios[-1]:6.2f} {actual / diag.planned_norm:6.2f} {changes[-1]:.4f}",
                flush=True,
            )
        print(
            f"{path.name}: actual / virtual mean {statistics.fmean(ratios):.3f} median {statistics.median(ratios):.3f}"
            f" (min {min(ratios):.2f}, max {max(ratios):.2f});"
            f" max dW/W of an edit mean {statistics.fmean(changes):.4f};"
            f" max dW/W after {len(requests)} edits {max(weight_growth(loaded, original, hparams.layers).values()):.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
