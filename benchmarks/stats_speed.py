"""How long the first run's statistics take, and whether a faster way of sampling changes them.

Samples the default model's ``C0`` (text the model writes itself) at each sampling batch size in
turn (``16@1``: batch 16 with seed 1, the noise between two samples; ``64s``: batch 64 with each
sequence of a round started from its own word), in one process, and prints
tokens per second and, per edited layer, the null-space projector's kept directions and the
relative difference to the first run's statistics. The files go to the home's statistics cache,
so a later ``metake bench`` with that batch size reuses them.

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/stats_speed.py --batch-sizes 16,16@1,64 \\
        --threads 2 --out benchmarks/results/stats-speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.hparams import EditHyperParams
from engine.models import load_model
from engine.projector import null_space_projector
from engine.stats import key_statistics
from storage.home import resolve_home


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir, device=args.device)
    hparams = EditHyperParams.defaults_for(loaded.model_type)
    runs: dict[str, Any] = {}
    means: dict[str, dict[int, torch.Tensor]] = {}
    for item in args.batch_sizes.split(","):
        batch, _, seed = item.partition("@")
        size = item
        params = dataclasses.replace(
            hparams.stats,
            batch_size=int(batch.removesuffix("s")),
            seed=int(seed or hparams.stats.seed),
            starts_per_sequence=batch.endswith("s"),
        )
        began = time.perf_counter()
        stats = key_statistics(loaded, hparams.layers, params, home.stats_dir)
        seconds = time.perf_counter() - began
        tokens = next(iter(stats.values())).count
        threshold = hparams.solver.nullspace_threshold
        kept = {layer: null_space_projector(s, threshold).kept for layer, s in stats.items()}
        means[size] = {layer: s.mean for layer, s in stats.items()}
        runs[size] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "kept": kept}
        print(f"batch {size:>3}: {seconds:6.1f} s for {tokens} tokens ({tokens / seconds:.0f} tok/s), kept {kept}")
    sizes = list(means)
    for size in sizes[1:]:
        diff = {
            layer: float((means[size][layer] - means[sizes[0]][layer]).norm() / means[sizes[0]][layer].norm())
            for layer in hparams.layers
        }
        runs[size]["relative_difference_to_first"] = diff
        print(f"batch {size} vs {sizes[0]}: ||C0 - C0'|| / ||C0'|| per layer {diff}")
    report = {
        "command": " ".join(["benchmarks/stats_speed.py", *argv]),
        "threads": torch.get_num_threads(),
        "device": str(loaded.device),
        "n_tokens": hparams.stats.n_tokens,
        "runs": runs,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
