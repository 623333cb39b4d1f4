"""The sequential state of an editor: everything besides the weights that later edits depend on.

Lifelong editing is only reproducible if this state travels with the weights: the accumulated
constraint ``C_prev = sum K K^T`` per layer (it protects earlier edits), the step count, and the
identities of the ``C0`` statistics and projectors it was built against. It is an immutable value,
passed into an edit and returned new from it, saved and loaded bitwise with safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.files import atomic_path, read_safetensors

FORMAT_VERSION = "3"
_READABLE_FORMATS = ("1", "2", FORMAT_VERSION)
"""Format 1 had no ``settings``: such states are checked on everything but those. Formats 1 and 2
had no ``projected``: the editor computes it from ``C_prev`` on their first edit."""
TENSOR_PREFIX = "state/"
METADATA_PREFIX = "state."


class StateMismatch(ValueError):  # noqa: N818 - reads as "the state does not match"
    """A saved state belongs to another model, layers or statistics than the editor's."""


@dataclass(frozen=True)
class EditorState:
    model_identity: str
    layers: tuple[int, ...]
    constraints: dict[int, torch.Tensor]
    """``C_prev`` per layer (float32, d_k x d_k; the solves run in float64). Float32 halves every
    checkpoint (SmolLM2: 47 instead of 94 MB) and loses nothing that matters: the sum of ``K K^T``
    over 10,000 edits carries a relative rounding error of about 1e-5."""
    steps: int = 0
    """Batches applied."""
    edits: int = 0
    """Requests applied."""
    c0_sha256: dict[int, str] = field(default_factory=dict)
    projector_sha256: dict[int, str] = field(default_factory=dict)
    prefixes: tuple[str, ...] = ()
    """The generic context prefixes used for every edit of this model's life."""
    settings: dict[str, str] = field(default_factory=dict)
    """The method and solver settings the constraints were accumulated under (see
    ``Editor.state_settings``); continuing a life under other ones would silently change what
    every later edit means, so a restore refuses them."""
    projected: dict[int, torch.Tensor] = field(default_factory=dict)
    """``P C_prev P`` per layer (float32) for the methods with a null-space projector, accumulated
    beside ``C_prev`` so that a solve never recomputes it (``engine.solver``); empty for MEMIT and
    for states saved before format 3 (the editor then computes it from ``C_prev``)."""
    base: dict[int, torch.Tensor] = field(default_factory=dict)
    """The edited layers' weights before the life's first edit, as stored in the model (only
    where ``[solver] spectral_cap`` restrains the accumulated change ``W - W0``; empty otherwise)."""

    @classmethod
    def fresh(
        cls,
        model_identity: str,
        layers: tuple[int, ...],
        d_k: int,
        device: torch.device | str = "cpu",
        c0_sha256: dict[int, str] | None = None,
        projector_sha256: dict[int, str] | None = None,
        prefixes: tuple[str, ...] = (),
        settings: dict[str, str] | None = None,
        projected: bool = False,
        base: dict[int, torch.Tensor] | None = None,
    ) -> EditorState:
        """No edits yet; ``projected``: also carry ``P C_prev P`` (zero) for a projector method;
        ``base``: the unedited weights the spectral cap measures the accumulated change from."""
        zeros = {layer: torch.zeros(d_k, d_k, dtype=torch.float32, device=device) for layer in layers}
        return cls(
            model_identity,
            tuple(layers),
            zeros,
            0,
            0,
            dict(c0_sha256 or {}),
            dict(projector_sha256 or {}),
            prefixes,
            dict(settings or {}),
            {layer: torch.zeros_like(zero) for layer, zero in zeros.items()} if projected else {},
            {layer: w.detach().clone() for layer, w in (base or {}).items()},
        )

    def after_batch(
        self,
        added: dict[int, torch.Tensor],
        n_requests: int,
        projected: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> EditorState:
        """A new state with ``K K^T`` of a batch added per layer it edited (the others keep
        theirs); this one is left untouched.

        ``projected`` maps a layer to ``(P C_prev P, (P K)(P K)^T)`` for the projector methods
        (the first from this state, or computed from ``C_prev`` when it has none)."""
        constraints = {
            layer: self.constraints[layer] + added[layer].to(self.constraints[layer])
            if layer in added
            else self.constraints[layer]
            for layer in self.layers
        }
        # a layer the batch edited keeps ``P C_prev P`` only if given (else it would be stale)
        new_projected = {layer: kept for layer, kept in self.projected.items() if layer not in added}
        new_projected.update({layer: before + more.to(before) for layer, (before, more) in (projected or {}).items()})
        return EditorState(
            self.model_identity,
            self.layers,
            constraints,
            self.steps + 1,
            self.edits + n_requests,
            self.c0_sha256,
            self.projector_sha256,
            self.prefixes,
            self.settings,
            new_projected,
            self.base,
        )

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_VERSION,
            "model_identity": self.model_identity,
            "layers": json.dumps(list(self.layers)),
            "steps": str(self.steps),
            "edits": str(self.edits),
            "c0_sha256": json.dumps({str(k): v for k, v in self.c0_sha256.items()}),
            "projector_sha256": json.dumps({str(k): v for k, v in self.projector_sha256.items()}),
            "prefixes": json.dumps(list(self.prefixes)),
            "settings": json.dumps(self.settings, sort_keys=True),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        constraints = {f"constraint.{layer}": self.constraints[layer] for layer in self.layers}
        projected = {f"projected.{layer}": self.projected[layer] for layer in self.layers if layer in self.projected}
        base = {f"base.{layer}": self.base[layer] for layer in self.layers if layer in self.base}
        return {name: t.detach().cpu().contiguous() for name, t in (constraints | projected | base).items()}

    def to_safetensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state's one on-disk form: safetensors tensors and metadata under names of its own
        (``state/...``, ``state....``), so that a file can hold other things beside it (a
        checkpoint holds the edited weights and its manifest)."""
        tensors = {f"{TENSOR_PREFIX}{name}": tensor for name, tensor in self.tensors().items()}
        metadata = {f"{METADATA_PREFIX}{key}": value for key, value in self.metadata().items()}
        return tensors, metadata

    @classmethod
    def from_safetensors(cls, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> EditorState:
        """The state among a file's metadata and tensors (anything else in the file is ignored)."""
        return cls.from_parts(
            {key.removeprefix(METADATA_PREFIX): v for key, v in metadata.items() if key.startswith(METADATA_PREFIX)},
            {name.removeprefix(TENSOR_PREFIX): t for name, t in tensors.items() if name.startswith(TENSOR_PREFIX)},
        )

    def save(self, path: str | Path) -> None:
        """Write the state alone to a safetensors file, atomically."""
        tensors, metadata = self.to_safetensors()
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def from_parts(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> EditorState:
        if meta.get("format") not in _READABLE_FORMATS:
            raise StateMismatch(f"unsupported editor state format {meta.get('format')!r}")
        layers = tuple(json.loads(meta["layers"]))
        return cls(
            meta["model_identity"],
            layers,
            {layer: tensors[f"constraint.{layer}"] for layer in layers},
            int(meta["steps"]),
            int(meta["edits"]),
            {int(k): v for k, v in json.loads(meta["c0_sha256"]).items()},
            {int(k): v for k, v in json.loads(meta["projector_sha256"]).items()},
            tuple(json.loads(meta["prefixes"])),
            json.loads(meta.get("settings", "{}")),
            {layer: tensors[f"projected.{layer}"] for layer in layers if f"projected.{layer}" in tensors},
            {layer: tensors[f"base.{layer}"] for layer in layers if f"base.{layer}" in tensors},
        )

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> EditorState:
        return cls.from_safetensors(*read_safetensors(Path(path), device))

    def check_compatible(
        self,
        model_identity: str,
        layers: tuple[int, ...],
        c0_sha256: dict[int, str],
        projector_sha256: dict[int, str] | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        """Raise :class:`StateMismatch` (one line) unless this state can continue under these settings."""
        if self.model_identity != model_identity:
            raise StateMismatch(f"state belongs to model {self.model_identity}, not {model_identity}")
        if self.layers != tuple(layers):
            raise StateMismatch(f"state edits layers {list(self.layers)}, the settings say {list(layers)}")
        if self.c0_sha256 and self.c0_sha256 != c0_sha256:
            raise StateMismatch("state was built against other C0 statistics than the cached ones")
        if self.settings and settings is not None:
            changed = [
                f"{key} {self.settings.get(key, '(unset)')} -> {settings.get(key, '(unset)')}"
                for key in sorted(set(self.settings) | set(settings))
                if self.settings.get(key) != settings.get(key)
            ]
            if changed:
                raise StateMismatch(f"state was built with other editing settings ({', '.join(changed)})")
        if self.projector_sha256 and projector_sha256 is not None and self.projector_sha256 != projector_sha256:
            raise StateMismatch("state was built against other null-space projectors than the cached ones")

    def equals(self, other: EditorState) -> bool:
        """Bitwise equality of tensors and metadata."""
        mine, theirs = self.tensors(), other.tensors()
        return (
            self.metadata() == other.metadata()
            and mine.keys() == theirs.keys()
            and all(torch.equal(mine[name], theirs[name]) for name in mine)
        )
