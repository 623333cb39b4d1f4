"""How far a life of edits moves the keys that the edits and the null space were computed from.

Every edit protects earlier ones through ``C_prev``, the sum of their keys ``k k^T`` as they were
when each was made, and keeps ordinary text's keys out of its way through a projector computed
once from the unedited model's ``C0``. But the critical layers are edited together, so every
change below a layer moves the keys it reads. This measures, per edited layer, on the model a
lifelong run saved (``resume-METHOD-N-weights.safetensors``):

- how far the first ``--n`` corrections' subject keys moved (``||k_now - k_then|| / ||k_then||``)
  since a reference point: the unedited model, or (``--reference``) the run's weights at an
  earlier point, e.g. right after those corrections were made, so that the move is what the
  later edits did to keys that ``C_prev`` holds as they were;
- how much that moves what the layer's change as of the reference gives those subjects
  (``||D (k_now - k_then)|| / ||D k_then||``, ``D = W_ref - W0``; with the unedited reference the
  whole change);
- how much of ordinary text's key energy falls in the projector's range (where edits act) with
  the reference model's keys and with the edited model's (with the unedited reference: the part
  of the leak that comes from the statistics growing stale).

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/key_drift.py --hparams H.toml \\
        --weights RUN/resume-alphaedit-2000-weights.safetensors \\
        --data ../shared/data/counterfact/easyedit_counterfact-train.json --offset 2000 --n 100 \\
        --text ../shared/data/corpus/wikitext-2_valid.tokens.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.architecture import as_out_in
from engine.editor import Editor, restore_weights, snapshot_weights
from engine.hooks import capture_inputs, run_until_stopped
from engine.hparams import EditHyperParams
from engine.models import LoadedModel, load_model
from engine.requests import Row, encode_with_subject, make_batch
from evaluation.counterfact import CounterFactRecord, load_counterfact
from storage.home import resolve_home


@torch.no_grad()
def subject_keys(
    loaded: LoadedModel, records: list[CounterFactRecord], layers: tuple[int, ...]
) -> dict[int, torch.Tensor]:
    """Each record's key at each layer (n x d_k): the edited module's input at the subject's last
    token of the bare rewrite prompt."""
    rows = [Row(*encode_with_subject(loaded.tokenizer, r.template, r.subject)) for r in records]
    return _keys(loaded, rows, layers, lambda batch: (batch.rows, batch.subject_pos))


@torch.no_grad()
def text_keys(
    loaded: LoadedModel, text: str, layers: tuple[int, ...], tokens: int, window: int = 128
) -> dict[int, torch.Tensor]:
    """Keys of every token of the first ``tokens`` tokens of ``text`` (windows of ``window``)."""
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    rows = [Row(ids[i : i + window]) for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    return _keys(loaded, rows, layers, lambda batch: batch.attention_mask.bool().nonzero(as_tuple=True))


def _keys(loaded: LoadedModel, rows: list[Row], layers: tuple[int, ...], where: object) -> dict[int, torch.Tensor]:
    names = {layer: loaded.spec.mlp_out_of(layer) for layer in layers}
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(rows), 16):
        batch = make_batch(rows[start : start + 16], loaded.tokenizer.pad_token_id or 0, loaded.device)
        with capture_inputs(loaded.model, list(names.values()), stop_after=names[max(layers)]) as seen:
            run_until_stopped(loaded.model.base_model, **batch.inputs())
        index = where(batch)  # type: ignore[operator]
        for layer, name in names.items():
            out[layer].append(seen[name][index].double())
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def _saved(path: Path, loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.to(loaded.device) for k, v in load_file(path).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True, help="A lifelong run's saved weights.")
    parser.add_argument(
        "--reference",
        type=Path,
        help="Saved weights of an earlier point of the same run (default: the unedited model).",
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--offset", type=int, default=2000)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--text-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir)
    hparams = EditHyperParams.from_file(args.hparams)
    layers = hparams.layers
    editor = Editor(loaded, hparams, home.stats_dir)  # for the projectors the run used
    records = load_counterfact(args.data, n=args.n, offset=args.offset)
    text = args.text.read_text(errors="replace")
    base = snapshot_weights(loaded, layers)
    if args.reference:
        restore_weights(loaded, layers, _saved(args.reference, loaded))
    reference = snapshot_weights(loaded, layers)
    then, text_then = subject_keys(loaded, records, layers), text_keys(loaded, text, layers, args.text_tokens)
    restore_weights(loaded, layers, _saved(args.weights, loaded))
    now, text_now = subject_keys(loaded, records, layers), text_keys(loaded, text, layers, args.text_tokens)
    figures = []
    print(
        "layer | subject key drift | change of D's output at them | text energy in P's range: reference / edited keys"
    )
    for layer in layers:
        name = loaded.spec.edited_weight_name(layer)
        # the change the reference point had made (the whole change when the reference is unedited)
        made = reference[name] if args.reference else snapshot_weights(loaded, (layer,))[name]
        d = as_out_in(made.double() - base[name].double(), loaded.spec)
        moved = (now[layer] - then[layer]).norm(dim=1) / then[layer].norm(dim=1)
        delivered = (d @ (now[layer] - then[layer]).T).norm(dim=0) / (d @ then[layer].T).norm(dim=0)
        p = editor.projectors[layer].matrix.to(loaded.device).double()

        def in_range(keys: torch.Tensor, p: torch.Tensor = p) -> float:
            return float((keys @ p).pow(2).sum() / keys.pow(2).sum())

        row = {
            "layer": layer,
            "subject_key_drift": statistics.median(moved.tolist()),
            "output_change_at_old_subjects": statistics.median(delivered.tolist()),
            "text_energy_in_range_reference": in_range(text_then[layer]),
            "text_energy_in_range_edited": in_range(text_now[layer]),
        }
        figures.append(row)
        print(
            f"{layer} | {row['subject_key_drift']:.3f} | {row['output_change_at_old_subjects']:.3f} | "
            f"{row['text_energy_in_range_reference']:.3f} / {row['text_energy_in_range_edited']:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"weights": str(args.weights), "n": args.n, "layers": figures}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
