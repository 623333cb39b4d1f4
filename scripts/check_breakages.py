"""Break the editing method on purpose, once per breakage, and check that a fast test fails.

Each breakage is one exact textual change to a scratch copy of the checkout (the working tree is
never touched); the fast engine tests then run on that copy. A breakage the tests survive is a
hole in the tests. Usage: ``.venv/bin/python scripts/check_breakages.py [NAME ...]``; exit 1 if
any breakage survives. Takes about 15 s a breakage on a 2-core CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Breakage:
    name: str
    path: str
    old: str
    new: str
    why: str

    def applies_to(self, text: str) -> bool:
        """Its text is in ``text`` exactly once, so the breakage changes what it names and nothing else."""
        return text.count(self.old) == 1


BREAKAGES = (
    Breakage(
        "outer-loop-plain-injector",
        "engine/editor.py",
        "virtual_update_injector(self.loaded, layer, operator),",
        "residual_injector(self.loaded, layer),",
        "MetaKE's outer loop plans on the residual stream instead of the virtual constrained update",
    ),
    Breakage(
        "price-ignores-B",
        "engine/editor.py",
        "return scale * (d.T @ b).pow(2).sum()",
        "return scale * d.pow(2).sum()",
        "the outer loop's price ignores the operator B",
    ),
    Breakage(
        "c-prev-replaced",
        "engine/state.py",
        "layer: self.constraints[layer] + added[layer].to(self.constraints[layer])\n",
        "layer: added[layer].to(self.constraints[layer])\n",
        "C_prev holds only the last batch's K K^T instead of the sum over all batches",
    ),
    Breakage(
        "spread-plan-not-virtual-target",
        "engine/editor.py",
        "targets = h + realised.T.to(h.dtype) if virtual_target else h + delta",
        "targets = h + delta",
        "spread_virtual_target spreads the plan h + delta instead of its virtual realisation h + G delta",
    ),
    Breakage(
        "last-layer-gap-not-closed",
        "engine/editor.py",
        "if even or (virtual_target and layer == last):",
        "if even:",
        "spread_virtual_target's last layer takes its share of the gap instead of closing it exactly",
    ),
    Breakage(
        "even-spread-share-not-solved",
        "engine/editor.py",
        'even = hp.solver.spread == "even"',
        "even = False",
        "spread = even asks each layer for its share instead of solving it through the layer's gain",
    ),
    Breakage(
        "rekey-drops-last-chunk",
        "engine/editor.py",
        "for start in range(0, len(encoded), chunk):",
        "for start in range(0, len(encoded) - chunk, chunk):",
        "re-keying leaves the last chunk of earlier requests out of the rebuilt C_prev",
    ),
    Breakage(
        "rekey-keeps-projected",
        "engine/editor.py",
        "return dataclasses.replace(state, constraints=constraints, projected=projected)",
        "return dataclasses.replace(state, constraints=constraints)",
        "re-keying rebuilds C_prev but leaves the state's P C_prev P as it was",
    ),
    Breakage(
        "room-counts-unprojected",
        "engine/editor.py",
        "constraint = projected.get(layer, state.constraints[layer])",
        "constraint = state.constraints[layer]",
        "the room used counts C_prev's directions, not those of its projection on the kept space",
    ),
    Breakage(
        "room-pinned-past-one",
        "engine/editor.py",
        "used[layer] = pinned_directions(constraint, alpha) / room if room else 1.0",
        "used[layer] = pinned_directions(constraint, 1.0) / room if room else 1.0",
        "the room used counts directions weighed past 1 instead of past the ridge alpha",
    ),
    Breakage(
        "gap-closed-by-inverse",
        "engine/editor.py",
        "residual = gap.double() @ torch.linalg.pinv(gain, rtol=1e-6)",
        "residual = torch.linalg.solve(gain.T, gap.double().T).T",
        "the last layer's gap is solved through G's inverse, singular for two requests about one subject",
    ),
    Breakage(
        "residual-undivided",
        "engine/editor.py",
        "share = (targets - current).T / (len(layers) - i)",
        "share = (targets - current).T",
        "the residual is not divided by the number of layers left",
    ),
    Breakage(
        "solve-ignores-c-prev",
        "engine/solver.py",
        "system = prev * projected.double() + hparams.solver.alpha * eye",
        "system = hparams.solver.alpha * eye",
        "AlphaEdit's solve forgets the accumulated constraint (earlier edits unprotected)",
    ),
    Breakage(
        "projected-not-accumulated",
        "engine/state.py",
        "{layer: before + more.to(before) for layer, (before, more) in (projected or {}).items()}",
        "{layer: before for layer, (before, more) in (projected or {}).items()}",
        "the state's P C_prev P stops following C_prev (the solve forgets later edits)",
    ),
    Breakage(
        "push-through-without-identity",
        "engine/solver.py",
        "inner = k.T @ z + torch.eye(k.shape[1], dtype=torch.float64, device=k.device)",
        "inner = k.T @ z + 0.5 * torch.eye(k.shape[1], dtype=torch.float64, device=k.device)",
        "the symmetric solve's push-through identity is wrong (another operator than the methods')",
    ),
    Breakage(
        "realised-norm-is-planned",
        "engine/editor.py",
        '"realised_norm": float(realised[:, r].norm()),',
        '"realised_norm": float(delta[r].norm()),',
        "the realised-norm diagnostic reports the planned norm",
    ),
    Breakage(
        "lm-head-shifted",
        "engine/scoring.py",
        "at_targets = head(hidden[batch.target_rows, batch.target_positions]).float()",
        "at_targets = head(hidden[batch.target_rows, batch.target_positions - 1]).float()",
        "the LM head is applied one position early",
    ),
    Breakage(
        "spectral-cap-from-current-weights",
        "engine/editor.py",
        "cap = self.hparams.solver.spectral_cap * cached[1]",
        "cap = self.hparams.solver.spectral_cap * largest_singular_value(weight)",
        "the spectral cap is a share of the edited weights' largest singular value instead of W0's",
    ),
    Breakage(
        "layer-groups-ignored",
        "engine/editor.py",
        "layers = hp.layers_of_batch(state.steps)",
        "layers = hp.layers",
        "every batch edits every layer, whatever group it is routed to",
    ),
    Breakage(
        "spectral-cap-base-dropped",
        "engine/state.py",
        "            new_projected,\n            self.base,\n",
        "            new_projected,\n            {},\n",
        "the state after a batch forgets W0, so the next capped edit cannot measure the accumulated change",
    ),
    Breakage(
        "unsaid-never-retried",
        "engine/editor.py",
        "pending = [i for i in range(u) if not said[i] and passes[i] < hp.max_passes]",
        "pending = []",
        "max_passes never plans again a request the model does not say after a pass",
    ),
    Breakage(
        "retry-keys-left-out",
        "engine/editor.py",
        "current = current.after_batch(done.added, 0, done.added_projected)",
        "current = current.after_batch(done.added, 0, done.added_projected) if first is done else current",
        "a retry pass's keys are not added to C_prev",
    ),
    Breakage(
        "said-first-token-only",
        "engine/scoring.py",
        "said += targets_are_top(at_targets, batch).tolist()",
        "said += targets_are_top(at_targets, batch).tolist()[:1] + [True] * (batch.input_ids.shape[0] - 1)",
        "the says check reads only the first request of each chunk and calls the rest said",
    ),
)


def scratch_copy(destination: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the checkout (no .venv, no caches)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


REVIEW_TEST = "tests/engine/test_method.py::test_every_breakage_still_names_text_the_engine_has_exactly_once"
"""Left out of the runs: a breakage removes its own text, which this test reports whatever the
breakage does, so it would catch every breakage whose new text does not contain the old."""


def run_tests(copy: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    pytest_args = ["-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", "--deselect", REVIEW_TEST, "tests/engine"]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *pytest_args],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )


def main(names: list[str]) -> int:
    chosen = [b for b in BREAKAGES if not names or b.name in names]
    if names and len(chosen) != len(names):
        known = ", ".join(b.name for b in BREAKAGES)
        print(f"unknown breakage in {names}; known: {known}", file=sys.stderr)
        return 2
    survived = []
    with tempfile.TemporaryDirectory(prefix="metake-breakages-") as tmp:
        pristine = Path(tmp) / "pristine"
        scratch_copy(pristine)
        probe = subprocess.run(
            [sys.executable, "-c", "import engine; print(engine.__file__)"],
            cwd=pristine,
            env={**os.environ, "PYTHONPATH": str(pristine)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not probe.startswith(str(pristine)):
            print(f"the tests would import the engine from {probe}, not the scratch copy", file=sys.stderr)
            return 2
        for breakage in chosen:
            copy = Path(tmp) / breakage.name
            shutil.copytree(pristine, copy)
            target = copy / breakage.path
            text = target.read_text()
            if not breakage.applies_to(text):
                print(f"{breakage.name}: the text to break is not in {breakage.path} exactly once", file=sys.stderr)
                return 2
            target.write_text(text.replace(breakage.old, breakage.new))
            started = time.perf_counter()
            result = run_tests(copy)
            failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
            caught = result.returncode != 0 and bool(failed)
            verdict = f"caught by {failed[0].split()[1]}" if caught else f"SURVIVED (pytest exit {result.returncode})"
            print(f"{breakage.name:28s} {verdict}  [{time.perf_counter() - started:.0f} s] - {breakage.why}")
            if not caught:
                survived.append(breakage.name)
            shutil.rmtree(copy)
        print("pristine copy:", "passes" if run_tests(pristine).returncode == 0 else "FAILS (fix that first)")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
