"""Continue a lifelong run's saved point with other corrections and other settings: a remedy probe.

A remedy for what happens late in a model's life (a full null space, a large plan) shows only
late, and a fresh run to 2,000 edits takes hours a method on this CPU. This copies a run's saved
point (weights, editor state, curves) to ``--out`` and goes on from it through the lifelong
benchmark with ``--method-hparams`` (any file the saved state fits: the solver's projector and
layers must match; a ``spectral_cap`` file gives a state saved without ``W0`` the unedited
weights) over ``--extra-n`` further records of another file, measured at their end:
the same stream, the same fixed sets, another tail. Tune on validation records, not on the
reported stream.

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/continue_lifelong.py --run /work/runs/metake \\
        --method metake --method-hparams benchmarks/hparams/variants/metake-null04-spread-virtual.toml \\
        --stream ../shared/data/counterfact/easyedit_counterfact-train.json --stream-offset 2000 --stream-n 2000 \\
        --extra ../shared/data/counterfact/easyedit_counterfact-val.json --extra-offset 300 --extra-n 100 \\
        --ppl-text ../shared/data/corpus/wikitext-2_valid.tokens.txt --threads 1 --out /work/runs/cont-metake
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from engine.editor import Editor
from engine.hparams import EditHyperParams
from engine.models import load_model
from engine.state import EditorState
from evaluation.counterfact import load_counterfact
from evaluation.lifelong import points_table, run_lifelong
from storage.home import resolve_home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a lifelong --out folder with a saved point")
    parser.add_argument("--method", required=True)
    parser.add_argument("--method-hparams", type=Path, required=True)
    parser.add_argument("--stream", type=Path, required=True, help="the run's --data")
    parser.add_argument("--stream-offset", type=int, required=True)
    parser.add_argument("--stream-n", type=int, required=True)
    parser.add_argument("--extra", type=Path, required=True, help="where the further records come from")
    parser.add_argument("--extra-offset", type=int, required=True)
    parser.add_argument("--extra-n", type=int, default=100)
    parser.add_argument("--ppl-text", type=Path, required=True)
    parser.add_argument("--ppl-chars", type=int, default=20000)
    parser.add_argument("--fluency-n", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta_name = f"resume-{args.method}.json"
    meta = json.loads((args.run / meta_name).read_text())
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new folder")
    args.out.mkdir(parents=True)
    for name in (meta_name, "curves.jsonl", meta["weights"], meta["state"]):
        shutil.copy2(args.run / name, args.out / name)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir)
    hparams = EditHyperParams.resolve(loaded.model_type, loaded.n_layers, args.method_hparams, args.method)
    state_path = args.out / meta["state"]
    state = EditorState.load(state_path)
    if hparams.solver.spectral_cap and not state.base:
        # A life started without the cap: its W0 is the unedited model's (a lifelong run starts there).
        editor = Editor(loaded, hparams, home.stats_dir)
        dataclasses.replace(state, base=editor.edited_layer_weights()).save(state_path)
        print(f"{state_path.name}: gave the state the unedited weights as W0 for the spectral cap", file=sys.stderr)
    records = load_counterfact(args.stream, args.stream_n, args.stream_offset)
    if int(meta["edits"]) != len(records):
        raise SystemExit(f"the saved point is at {meta['edits']} edits, the stream has {len(records)} records")
    records += load_counterfact(args.extra, args.extra_n, args.extra_offset)
    texts = [args.ppl_text.read_text(errors="replace")[: args.ppl_chars]]
    points = run_lifelong(
        loaded,
        {args.method: hparams.with_changes(method=args.method)},
        records,
        1,
        args.extra_n,
        args.out,
        home.stats_dir,
        texts,
        fluency_n=args.fluency_n,
    )
    (args.out / "command.json").write_text(json.dumps({"command": sys.argv, "hparams": str(args.method_hparams)}))
    print(points_table(points, (int(meta["edits"]), len(records))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
