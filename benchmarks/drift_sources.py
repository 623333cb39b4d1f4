"""Where sequential edits' perplexity drift comes from: which layer, and through which directions.

The null-space projector keeps the directions in which the sampled key statistics ``C0`` have
eigenvalues below a threshold, so an update ``dW = dW P`` can still move the layer's output on any
key with energy in those directions. This benchmark measures, per edited layer:

- before any edit: the share of ``tr(C)`` that passes the projector, ``tr(P C) / tr(C)``, for
  ``C0`` (what the projector was built from) and for the keys of the perplexity text;
- after N sequential edits: ``||D|| / ||W0||`` with ``D = W - W0``, the relative change of the
  layer's output on each text's keys, ``sqrt(tr(D C D^T) / tr(W0 C W0^T))``, and the perplexity
  with only that layer's change reverted and with only that layer's change kept.

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/drift_sources.py \\
        --data ../shared/data/counterfact/easyedit_counterfact-val.json --offset 20 --n 60 \\
        --ppl-text ../shared/data/corpus/wikitext-2_valid.tokens.txt --methods metake,alphaedit \\
        --threads 2 --out benchmarks/results/drift-sources-val20-n60.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from engine.architecture import as_out_in
from engine.editor import Editor, restore_weights
from engine.hparams import EditHyperParams, StatsParams
from engine.models import load_model
from engine.stats import key_statistics
from evaluation.bench import weight_growth
from evaluation.counterfact import load_counterfact
from evaluation.metrics import perplexity
from storage.home import resolve_home

HERE = Path(__file__).resolve().parent


def passing_share(projector: torch.Tensor, second_moment: torch.Tensor) -> float:
    """``tr(P C) / tr(C)``: the share of the keys' energy an update confined to ``P`` can reach."""
    c = second_moment.double()
    return float(torch.trace(projector.double() @ c) / torch.trace(c))


def output_change(change: torch.Tensor, weight: torch.Tensor, second_moment: torch.Tensor) -> float:
    """``sqrt(tr(D C D^T) / tr(W C W^T))`` for (out x in) matrices: the RMS change of the layer's
    output on keys with second moment ``C``, relative to the output itself."""
    c = second_moment.double()
    d, w = change.double(), weight.double()
    return float(torch.sqrt(torch.trace(d @ c @ d.T) / torch.trace(w @ c @ w.T)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--offset", type=int, default=20)
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--methods", default="metake,alphaedit")
    parser.add_argument("--hparams-dir", type=Path, default=HERE / "hparams")
    parser.add_argument("--ppl-text", type=Path, required=True)
    parser.add_argument("--ppl-chars", type=int, default=20000)
    parser.add_argument("--text-tokens", type=int, default=30000, help="tokens of --ppl-text for its key statistics")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--weights", action="append", default=[], metavar="METHOD=FILE", help="a saved point's edited weights"
    )
    parser.add_argument(
        "--method-hparams", action="append", default=[], metavar="METHOD=TOML", help="instead of --hparams-dir's file"
    )
    args = parser.parse_args(argv)
    saved = dict(item.split("=", 1) for item in args.weights)
    files = dict(item.split("=", 1) for item in args.method_hparams)
    if args.threads:
        torch.set_num_threads(args.threads)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir)
    spec = loaded.spec
    text = [args.ppl_text.read_text(errors="replace")[: args.ppl_chars]]
    records = load_counterfact(args.data, n=args.n, offset=args.offset)
    requests = [r.request() for r in records]
    ppl_unedited = perplexity(loaded.model, loaded.tokenizer, text)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "threads": torch.get_num_threads(),
        "records": f"{args.data.name} {args.offset}-{args.offset + args.n - 1}",
        "ppl_unedited": ppl_unedited,
        "methods": {},
    }
    for method in args.methods.split(","):
        hparams = EditHyperParams.from_file(Path(files.get(method, args.hparams_dir / f"{method}.toml")))
        editor = Editor(loaded, hparams, home.stats_dir)
        text_stats = key_statistics(
            loaded,
            hparams.layers,
            StatsParams(source=str(args.ppl_text), n_tokens=args.text_tokens, seq_len=hparams.stats.seq_len),
            home.stats_dir,
        )
        base = editor.edited_weights()
        state = editor.new_state()
        start = time.perf_counter()
        if method in saved:
            editor.load_weights({k: v.to(loaded.device) for k, v in load_file(saved[method]).items()})
        else:
            for i, request in enumerate(requests):
                state = editor.apply([request], state).state
                print(f"{method}: {i + 1}/{len(requests)} edits", file=sys.stderr, end="\r")
        seconds = time.perf_counter() - start
        edited = editor.edited_weights()
        ppl_edited = perplexity(loaded.model, loaded.tokenizer, text)
        growth = weight_growth(loaded, base, hparams.layers)
        layers: dict[int, dict[str, float]] = {}
        for layer in hparams.layers:
            name = spec.edited_weight_name(layer)
            w0 = as_out_in(base[name], spec)
            change = as_out_in(edited[name], spec) - w0
            projector = editor.projectors[layer].matrix
            row: dict[str, float] = {
                "kept": editor.projectors[layer].kept,
                "c0_share_passing": passing_share(projector, editor.stats[layer].mean),
                "text_share_passing": passing_share(projector, text_stats[layer].mean),
                "rel_dW": growth[layer],
                "c0_output_change": output_change(change, w0, editor.stats[layer].mean),
                "text_output_change": output_change(change, w0, text_stats[layer].mean),
            }
            restore_weights(loaded, hparams.layers, {**edited, name: base[name]})
            row["ppl_this_reverted"] = perplexity(loaded.model, loaded.tokenizer, text)
            restore_weights(loaded, hparams.layers, {**base, name: edited[name]})
            row["ppl_only_this"] = perplexity(loaded.model, loaded.tokenizer, text)
            layers[layer] = row
        editor.load_weights(base)
        report["methods"][method] = {
            "ppl_edited": ppl_edited,
            "weights": saved.get(method),
            "seconds_per_edit": None if method in saved else seconds / len(requests),
            "layers": layers,
        }
        print(json.dumps({method: report["methods"][method]}, indent=1), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
