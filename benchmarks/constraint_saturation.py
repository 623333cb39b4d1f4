"""How much of each edited layer's room for edits a life of corrections has used.

AlphaEdit and MetaKE edit a layer only along the projector's range (the directions the unedited
model's key statistics ``C0`` leave nearly empty: ``kept`` of the layer's ``d_k``), and protect
earlier corrections through ``P C_prev P``. Each correction adds about one direction to it, so
once ``P C_prev P`` has an eigenvalue above the solve's ridge ``alpha`` in every kept direction, a
new correction can only move keys that earlier ones are pinned to, and the realised gain falls.
MEMIT has no projector, so its room is the whole ``d_k``. Prints, per saved state and layer, the
directions of the protected constraint with eigenvalue above 1 and above ``alpha`` against that
room:

    METAKE_HOME=/tmp/mk-home .venv/bin/python benchmarks/constraint_saturation.py --hparams H.toml \\
        RUN/resume-alphaedit-2000-state [MORE_STATES...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engine.editor import Editor
from engine.hparams import EditHyperParams
from engine.models import load_model
from engine.projector import pinned_directions
from engine.state import EditorState
from storage.home import resolve_home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hparams", type=Path, required=True, help="the run's hyperparameter file")
    parser.add_argument("states", nargs="+", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    home = resolve_home(None)
    loaded = load_model("default", cache_dir=home.models_dir)
    hparams = EditHyperParams.from_file(args.hparams)
    editor = Editor(loaded, hparams, home.stats_dir)
    room = {layer: p.kept for layer, p in editor.projectors.items()} if hparams.method != "memit" else {}
    alpha = hparams.solver.alpha
    print(f"| state | edits | {' | '.join(f'layer {layer}' for layer in hparams.layers)} |")
    print(f"|---|---|{'---|' * len(hparams.layers)}")
    for path in args.states:
        state = EditorState.load(path)
        cells = []
        for layer in hparams.layers:
            constraint = state.projected.get(layer, state.constraints[layer])
            free = room.get(layer, editor.key_width)
            cells.append(f"{pinned_directions(constraint, 1.0)} / {pinned_directions(constraint, alpha)} of {free}")
        print(f"| {path.name} | {state.edits} | {' | '.join(cells)} |")
    print(f"(directions with eigenvalue > 1 / > alpha = {alpha:g}, of the room: the kept directions, or d_k)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
