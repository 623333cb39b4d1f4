"""Seconds per edit, side by side in one process: planning variants, and batch sizes.

Absolute times differ between machines and with load, so this benchmark only compares: every
variant edits the same records from the same base weights and a fresh state (the edits are not
accumulated), the variants take turns record by record so that a change of load hits them alike,
and the table gives each one's median against the first variant's. It also reports the plan's
steps and whether each edit holds afterwards, so that a faster variant that edits worse shows.

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/edit_speed.py \\
        --data ../shared/data/counterfact/easyedit_counterfact-train.json --offset 1000 --n 16 \\
        --batch-sizes 1,4,16 --threads 2 --out benchmarks/results/edit-speed.json

Variants (``--variants``) name a method and a change to its tuned file in benchmarks/hparams:
``alphaedit:nocache`` plans without the prefix cache, ``metake:cached`` applies MetaKE's virtual
update only from the subject on (``[outer] cache_prefix``), ``:bf16`` plans under bfloat16
autocast (``plan_dtype``); suffixes combine with ``+``.
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
from engine.requests import EditRequest
from evaluation.counterfact import load_counterfact
from storage.home import resolve_home

HERE = Path(__file__).resolve().parent

CHANGES: dict[str, dict[str, Any]] = {
    "": {},
    "nocache": {"upstream": {"cache_prefix": False}, "outer": {"cache_prefix": False}},
    "cached": {"upstream": {"cache_prefix": True}, "outer": {"cache_prefix": True}},
    "bf16": {"plan_dtype": "bfloat16"},
}
"""What a variant's suffix changes in the method's tuned hyperparameters (``metake:cached+bf16``)."""


def variant_hparams(name: str, hparams_dir: Path) -> EditHyperParams:
    method, _, suffixes = name.partition(":")
    hparams = EditHyperParams.from_file(hparams_dir / f"{method}.toml")
    for suffix in suffixes.split("+"):
        hparams = hparams.with_changes(**CHANGES[suffix])
    return hparams


def time_batches(
    editor: Editor, base: dict[str, torch.Tensor], requests: list[EditRequest], batch_size: int
) -> list[dict[str, Any]]:
    """Apply each batch from the base weights and a fresh state; one row per batch."""
    rows = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        editor.load_weights(base)
        began = time.perf_counter()
        outcome = editor.apply(batch, editor.new_state())
        seconds = time.perf_counter() - began
        rows.append(
            {
                "n": len(batch),
                "s_per_edit": seconds / len(batch),
                "stages": {k: v / len(batch) for k, v in outcome.seconds.items() if k != "total"},
                "steps": [d.upstream_steps + d.outer_steps for d in outcome.applied],
                "holds": [d.post.holds for d in outcome.applied],
            }
        )
    editor.load_weights(base)
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    stages = sorted({k for r in rows for k in r["stages"]})
    steps = [s for r in rows for s in r["steps"]]
    holds = [h for r in rows for h in r["holds"]]
    return {
        "edits": sum(r["n"] for r in rows),
        "median_s_per_edit": statistics.median(r["s_per_edit"] for r in rows),
        "stage_median_s": {k: statistics.median(r["stages"].get(k, 0.0) for r in rows) for k in stages},
        "mean_steps": statistics.fmean(steps) if steps else 0.0,
        "holds": sum(holds) / len(holds) if holds else 0.0,
    }


def compare_variants(editors: dict[str, Editor], requests: list[EditRequest]) -> dict[str, dict[str, Any]]:
    """Single edits, variants in turn per record."""
    base = next(iter(editors.values())).edited_weights()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in editors}
    for i, request in enumerate(requests):
        for name, editor in editors.items():
            rows[name] += time_batches(editor, base, [request], 1)
        print(f"record {i + 1}/{len(requests)}", file=sys.stderr, flush=True)
    return {name: summarise(r) for name, r in rows.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a CounterFact file")
    parser.add_argument("--offset", type=int, default=1000)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--variants", default="alphaedit:nocache,alphaedit,metake,metake:cached")
    parser.add_argument("--batch-sizes", default="", help="e.g. 1,4,16: a sweep for the first variant's method")
    parser.add_argument("--batch-method", default="alphaedit")
    parser.add_argument("--hparams-dir", type=Path, default=HERE / "hparams")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir, device=args.device)
    records = load_counterfact(args.data, args.n, offset=args.offset)
    requests = [r.request() for r in records]
    report: dict[str, Any] = {
        "command": " ".join(["benchmarks/edit_speed.py", *argv]),
        "threads": torch.get_num_threads(),
        "device": str(loaded.device),
        "records": f"{args.data.name} {args.offset}..{args.offset + len(requests) - 1}",
    }
    if args.variants:
        names = args.variants.split(",")
        editors = {n: Editor(loaded, variant_hparams(n, args.hparams_dir), home.stats_dir) for n in names}
        variants = compare_variants(editors, requests)
        first = variants[names[0]]["median_s_per_edit"]
        for summary in variants.values():
            summary["vs_first"] = summary["median_s_per_edit"] / first
        report["variants"] = variants
        print(f"{'variant':<20} {'s/edit':>7} {'x first':>8} {'steps':>6} {'holds':>6}  stages (median s)")
        for name, s in variants.items():
            stages = " ".join(f"{k}={v:.2f}" for k, v in s["stage_median_s"].items())
            print(
                f"{name:<20} {s['median_s_per_edit']:7.2f} {s['vs_first']:8.2f} {s['mean_steps']:6.1f} "
                f"{s['holds']:6.2f}  {stages}"
            )
    if args.batch_sizes:
        editor = Editor(loaded, variant_hparams(args.batch_method, args.hparams_dir), home.stats_dir)
        base = editor.edited_weights()
        sweep = {}
        for size in (int(x) for x in args.batch_sizes.split(",")):
            rows = time_batches(editor, base, requests, size)
            total = sum(r["s_per_edit"] * r["n"] for r in rows)
            sweep[str(size)] = summarise(rows) | {"mean_s_per_edit": total / len(requests)}
            s = sweep[str(size)]
            print(f"{args.batch_method} batch {size:>4}: {s['mean_s_per_edit']:.2f} s/edit, holds {s['holds']:.2f}")
        report["batch_sizes"] = {"method": args.batch_method, "by_size": sweep}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
