"""AlphaEdit's null-space projector of ``C0``, cached next to the statistics it came from.

``P`` projects onto the eigenvectors of ``C0 = E[k k^T]`` whose eigenvalues are below the
threshold: directions that preserved keys (almost) never use, where a weight change cannot
disturb what the model already knows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.files import atomic_path
from engine.stats import KeyStatistics


@dataclass(frozen=True)
class Projector:
    layer: int
    matrix: torch.Tensor
    """``U_null U_null^T`` (float64, d_k x d_k)."""
    kept: int
    """How many directions the projector keeps (the dimension of the null space)."""
    threshold: float
    c0_sha256: str

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.matrix.shape[0]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.matrix.cpu().contiguous().numpy().tobytes()).hexdigest()


def pinned_directions(constraint: torch.Tensor, above: float) -> int:
    """How many directions the (symmetric) accumulated constraint holds with more weight than ``above``.

    Each correction pins about one direction of ``P C_prev P``; once a layer's kept directions are
    all pinned past the solve's ridge, new corrections can only move keys earlier ones hold, and
    the realised gain and retention fall together (docs/lifelong.md, "The room fills up")."""
    return int((torch.linalg.eigvalsh(constraint.double()) > above).sum())


def null_space_projector(stats: KeyStatistics, threshold: float, relative: bool = False) -> Projector:
    eigenvalues, eigenvectors = torch.linalg.eigh(stats.mean.double())
    cut = threshold * float(eigenvalues.max()) if relative else threshold
    null = eigenvectors[:, eigenvalues < cut]
    return Projector(stats.layer, null @ null.T, int(null.shape[1]), threshold, stats.sha256)


def projector_for(stats: KeyStatistics, threshold: float, cache_dir: Path | None, relative: bool = False) -> Projector:
    """The projector for ``stats`` at ``threshold``, read from or written to ``cache_dir``."""
    if cache_dir is None:
        return null_space_projector(stats, threshold, relative)
    mode = "rel" if relative else "abs"
    path = cache_dir / f"projector-{stats.sha256[:16]}-{mode}{threshold:g}.safetensors"
    if path.exists():
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
            matrix = handle.get_tensor("matrix")
        cached = Projector(stats.layer, matrix, int(meta["kept"]), float(meta["threshold"]), meta["c0_sha256"])
        # A file whose matrix no longer hashes to what was recorded when it was written (damaged,
        # or edited) is not used: the projector is computed again from the statistics (seconds).
        if meta.get("matrix_sha256") == cached.sha256 and cached.c0_sha256 == stats.sha256:
            return cached
    projector = null_space_projector(stats, threshold, relative)
    meta = {
        "layer": str(stats.layer),
        "kept": str(projector.kept),
        "threshold": repr(threshold),
        "relative": str(relative),
        "c0_sha256": stats.sha256,
        "matrix_sha256": projector.sha256,
        "module": str(stats.provenance.get("module", "")),
        "model": str(stats.provenance.get("model", "")),
    }
    with atomic_path(path) as tmp:
        save_file({"matrix": projector.matrix.contiguous()}, tmp, metadata=meta)
    return projector
