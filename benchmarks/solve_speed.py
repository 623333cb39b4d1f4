"""Seconds of the constrained solves per edit: the direct form against the symmetric one, in one process.

An edit solves for the operator ``B`` once per edited layer and once more for the last layer
(the plan's setup). The direct form (``engine.solver.direct_operator``) forms ``P (K K^T + M)``
and LU-factorises it for every solve; the symmetric form (``engine.solver.update_operator``)
factorises ``P C_prev P + alpha I`` once per layer and edit, from the ``P C_prev P`` the state
carries. Both run here on the default model's real ``C0`` statistics and projectors, with a
``C_prev`` of ``--earlier`` keys drawn from ``N(0, C0)``, taking turns per repetition; the table
gives the median seconds per edit and the largest relative difference between the two operators.

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/solve_speed.py --threads 1 --batch 1 \\
        --out benchmarks/results/solve-speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.editor import Editor
from engine.hparams import EditHyperParams
from engine.models import load_model
from engine.solver import direct_operator, layer_constraint, project_constraint, update_operator
from storage.home import resolve_home

HERE = Path(__file__).resolve().parent


def edit_solves(
    editor: Editor,
    method: str,
    keys: dict[int, torch.Tensor],
    c_prev: dict[int, torch.Tensor],
    projected: dict[int, torch.Tensor],
) -> tuple[float, dict[int, torch.Tensor]]:
    """One edit's solves in the given form: (seconds, operators in solve order)."""
    hp = editor.hparams
    device = editor.loaded.device
    c0s = {layer: s.mean.to(device) for layer, s in editor.stats.items()}
    projectors = {layer: p.matrix.to(device) for layer, p in editor.projectors.items()}
    began = time.perf_counter()
    operators = {}
    if method == "direct":
        for i, layer in enumerate((hp.last_layer, *hp.layers)):
            preserved = c_prev[layer].double()
            if hp.method == "memit":
                operators[i] = direct_operator(keys[layer], None, hp.solver.mom2_weight * c0s[layer] + preserved, 0.0)
            else:
                operators[i] = direct_operator(keys[layer], projectors[layer], preserved, hp.solver.alpha)
    else:
        constraints = {
            layer: layer_constraint(hp, c0s[layer], projectors[layer], c_prev[layer], projected.get(layer))
            for layer in hp.layers
        }
        for i, layer in enumerate((hp.last_layer, *hp.layers)):
            operators[i] = update_operator(keys[layer], constraints[layer])
    return time.perf_counter() - began, operators


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="alphaedit,memit")
    parser.add_argument("--batch", type=int, default=1, help="keys per solve (requests in a batch)")
    parser.add_argument("--earlier", type=int, default=200, help="keys accumulated in C_prev")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hparams-dir", type=Path, default=HERE / "hparams")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir, device=args.device)
    report: dict[str, Any] = {
        "command": " ".join(["benchmarks/solve_speed.py", *argv]),
        "threads": torch.get_num_threads(),
        "device": str(loaded.device),
        "batch": args.batch,
        "earlier": args.earlier,
        "methods": {},
    }
    gen = torch.Generator(device="cpu").manual_seed(0)
    for method in args.methods.split(","):
        editor = Editor(loaded, EditHyperParams.from_file(args.hparams_dir / f"{method}.toml"), home.stats_dir)
        draw = {}
        for layer in editor.hparams.layers:
            c0 = editor.stats[layer].mean.double().cpu()
            root = torch.linalg.cholesky(c0 + 1e-9 * torch.eye(c0.shape[0], dtype=torch.float64))
            draw[layer] = lambda n, root=root: root @ torch.randn(root.shape[0], n, generator=gen, dtype=torch.float64)
        c_prev = {layer: (k := draw[layer](args.earlier).to(loaded.device)) @ k.T for layer in editor.hparams.layers}
        c_prev = {layer: c.float() for layer, c in c_prev.items()}
        projected = (
            {}
            if method == "memit"
            else {layer: project_constraint(editor.projectors[layer].matrix.to(c), c) for layer, c in c_prev.items()}
        )
        seconds: dict[str, list[float]] = {"direct": [], "symmetric": []}
        worst = 0.0
        for _ in range(args.repeats):
            keys = {layer: draw[layer](args.batch).float().to(loaded.device) for layer in editor.hparams.layers}
            results = {}
            for form in seconds:
                took, operators = edit_solves(editor, form, keys, c_prev, projected)
                seconds[form].append(took)
                results[form] = operators
            for i, want in results["direct"].items():
                worst = max(worst, float((results["symmetric"][i] - want).norm() / want.norm()))
        row = {form: statistics.median(s) for form, s in seconds.items()}
        row |= {"speedup": row["direct"] / row["symmetric"], "max_relative_difference": worst}
        report["methods"][method] = row
        print(
            f"{method:<10} direct {row['direct']:.3f} s  symmetric {row['symmetric']:.3f} s  "
            f"x{row['speedup']:.1f}  max |dB|/|B| {worst:.1e}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
