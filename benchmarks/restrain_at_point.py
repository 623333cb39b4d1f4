"""What restraining a saved point's accumulated change ``W - W0`` buys and costs, after the fact.

Each restraint is applied to every edited layer of the saved weights at once, then the model is
measured on the lifelong stream: retention (the lifelong benchmark's fixed sample, and its first
100), teacher-forced efficacy and generalisation of the stream's last 100 records, perplexity.
Restraints: ``scale@x`` (``x (W - W0)``), ``cap@x`` (singular values capped at ``x sigma_max(W0)``,
``[solver] spectral_cap``), ``log@x`` (PRUNE's log restraint of what exceeds ``x sigma_max(W0)``).

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/restrain_at_point.py \\
        --data ../shared/data/counterfact/easyedit_counterfact-train.json --offset 2000 --n 2000 \\
        --ppl-text ../shared/data/corpus/wikitext-2_valid.tokens.txt --threads 1 \\
        --restraints none,scale@0.75,cap@0.75,log@1.0 --weights RUN/resume-metake-2000-weights.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.editor import restore_weights, snapshot_weights
from engine.hparams import EditHyperParams
from engine.models import load_model
from engine.solver import cap_singular_values, largest_singular_value
from evaluation.counterfact import load_counterfact
from evaluation.lifelong import RETENTION_FIRST, retention_sample
from evaluation.metrics import counterfact_metrics, perplexity, score_records
from storage.home import resolve_home


def restrained(change: torch.Tensor, base: torch.Tensor, restraint: str) -> torch.Tensor:
    """``change`` under one restraint (see the module's docstring), float64."""
    if restraint == "none":
        return change.double()
    kind, _, share = restraint.partition("@")
    x = float(share)
    if kind == "scale":
        return x * change.double()
    threshold = x * largest_singular_value(base)
    if kind == "cap":
        return cap_singular_values(change, threshold)[0]
    if kind == "log":
        u, s, vh = torch.linalg.svd(change.double(), full_matrices=False)
        return (u * torch.where(s > threshold, threshold + torch.log(s / threshold), s)) @ vh
    raise ValueError(f"unknown restraint {restraint!r}: none, scale@x, cap@x or log@x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--offset", type=int, required=True)
    parser.add_argument("--n", type=int, required=True, help="the records the saved point applied")
    parser.add_argument("--ppl-text", type=Path, required=True)
    parser.add_argument("--ppl-chars", type=int, default=20000)
    parser.add_argument("--restraints", default="none,cap@0.75")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weights", type=Path, action="append", required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = EditHyperParams.resolve(loaded.model_type, loaded.n_layers, None).layers
    unedited = snapshot_weights(loaded, layers)
    records = load_counterfact(args.data, args.n, args.offset)
    sample = [records[i] for i in retention_sample(len(records))]
    window = records[-100:]
    texts = [args.ppl_text.read_text(errors="replace")[: args.ppl_chars]]
    print("| weights | restraint | retained % | first 100 % | eff % | gen % | ppl |\n|---|---|---|---|---|---|---|")
    for file in args.weights:
        saved = load_file(file)
        for restraint in args.restraints.split(","):
            weights = {
                name: (base.double() + restrained(saved[name] - base, base, restraint)).to(base.dtype)
                for name, base in unedited.items()
            }
            restore_weights(loaded, layers, weights)
            kept = score_records(model, tokenizer, sample, ("rewrite",))
            retained = counterfact_metrics(kept)["efficacy"]
            first = counterfact_metrics(kept[:RETENTION_FIRST])["efficacy"]
            last = counterfact_metrics(score_records(model, tokenizer, window, ("rewrite", "paraphrase")))
            ppl = perplexity(model, tokenizer, texts)
            cells = [file.name, restraint, f"{retained:.1f}", f"{first:.1f}"]
            cells += [f"{last['efficacy']:.0f}", f"{last['generalisation']:.0f}", f"{ppl:.2f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
        restore_weights(loaded, layers, unedited)
    return 0


if __name__ == "__main__":
    sys.exit(main())
