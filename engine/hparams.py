"""Typed hyperparameters, loaded from TOML files (defaults per model family ship with the engine).

Every field that changes an edit's numbers lives here, so that an edit's record (the JSON of
these dataclasses) is enough to reproduce it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from engine.architecture import FAMILY_OF_MODEL_TYPE, ArchitectureSpec
from engine.methods import METHODS, Method

PLAN_DTYPES = ("float32", "bfloat16")
SPREADS = ("remainder", "even")


@dataclass(frozen=True)
class UpstreamParams:
    """Optimisation of the target residual ``delta`` at the last critical layer (MEMIT's compute_z)."""

    lr: float = 0.5
    max_steps: int = 25
    steps_after_success: int = 2
    """Early stop: this many steps after the target is the most likely continuation (ENCORE)."""
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    n_prefixes: int = 4
    """Short generic prefixes (sampled from the model once) put in front of the rewrite prompt."""
    prefix_tokens: int = 5
    cache_prefix: bool = True
    """Run the tokens before each subject once per plan instead of every step (exact; speed only)."""


@dataclass(frozen=True)
class SolverParams:
    """The constrained downstream update shared by MEMIT, AlphaEdit and MetaKE."""

    alpha: float = 10.0
    """AlphaEdit's ridge term added to ``(K K^T + C_prev) P``."""
    mom2_weight: float = 15000.0
    """MEMIT's lambda in front of ``C0``."""
    nullspace_threshold: float = 2e-2
    """Eigenvalues of ``C0`` below this span the null space the projector keeps."""
    nullspace_relative: bool = False
    """Read the threshold as a share of the largest eigenvalue instead of a raw value."""
    null_space_c0_weight: float = 0.0
    """Projector methods: weight of ``P C0 P`` in the constraint, a price on the preserved keys'
    energy that the projector lets through (its eigenvalues below the threshold). 0 is AlphaEdit's
    hard projection alone."""
    accumulated_weight: float = 1.0
    """Weight ``v`` of ``C_prev``, the earlier corrections' keys, in the constraint (``M = v C_prev
    + ...``, ``engine.solver``): above 1 an edit protects what earlier corrections wrote more than
    it fits its own keys. 1 is the methods as published."""
    spread: str = "remainder"
    """How a batch's target is shared over the edited layers, lowest first, each asked for
    ``1 / (layers left)`` of the gap still open. ``remainder`` (MEMIT's): a layer is asked for its
    share and realises its gain's part of it, and what it does not realise is left to the layers
    above, so the last layer takes most of the change. ``even``: each layer's residual is solved
    through its own gain (as the last layer's is under ``[outer] spread_virtual_target``), so that
    it realises its share at the batch's keys and the change is shared evenly; the last layer
    closes the gap."""
    spectral_cap: float = 0.0
    """After every batch, cap each singular value of an edited layer's accumulated change
    ``W - W0`` at this share of ``W0``'s largest singular value (0: off). A restraint of the
    perturbation after PRUNE (Ma et al., ICLR 2025), which log-restrains what exceeds ``W0``'s
    largest; a hard cap instead, so that applying it again changes nothing. Late in a life a few
    directions of the change outgrow the weights themselves (docs/lifelong.md); the state then
    carries ``W0``."""


@dataclass(frozen=True)
class OuterParams:
    """MetaKE's outer loop: optimise the plan under the virtual constrained update ``R B``."""

    steps: int = 10
    lr: float = 0.1
    beta: float = 0.0625
    """Weight of the locality KL under the virtual update."""
    gamma: float = 50.0
    """Price of the realised weight change, ``||R B||^2 / ||W||^2``."""
    safety_clamp_factor: float = 1.5
    """Generous bound on ``||delta|| / ||h||`` replacing the upstream uniform clamp."""
    steps_after_success: int = 1
    target_margin: float = 0.0
    """Stop once every target token is the top prediction with this log-probability margin."""
    warm_start: bool = False
    """Start from the upstream plan (True) or from zero, skipping the upstream stage (False)."""
    lr_zero_start: float = 0.6
    """Learning rate when starting from zero (the upstream's, since the loop then does its work)."""
    generic_kl: bool = False
    """Also anchor the next-token distribution after the generic prefixes (unrelated text)."""
    cache_prefix: bool = False
    """Apply the virtual update only from each subject on and cache the tokens before it
    (faster; an approximation, since the real update also reaches the earlier tokens)."""
    spread_virtual_target: bool = False
    """Spread what the virtual update realises, ``h + G delta``, over the critical layers (the
    last layer closing the gap exactly) instead of the plan ``h + delta``: the plan was optimised
    under the last layer's gain ``G`` alone, and the multi-layer spread realises more of it (on
    the default model 1.13x the virtual realisation on average over 20 edits), so the weights
    move further than the outer loop found necessary."""


@dataclass(frozen=True)
class StatsParams:
    """Where ``C0 = E[k k^T]`` comes from."""

    source: str = "model"
    """``model`` (text sampled from the model itself) or a path to a text file or folder."""
    n_tokens: int = 30000
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    starts_per_sequence: bool = False
    """Sampling only: start the sequences of one round from different short words (cycling through
    all of them) instead of every sequence of a round from the same word, so that a few large
    rounds see as many beginnings as many small ones."""


@dataclass(frozen=True)
class EditHyperParams:
    layers: tuple[int, ...]
    method: Method = "metake"
    layer_groups: tuple[tuple[int, ...], ...] = ()
    """Route the batches to these groups of ``layers`` in turn (batch ``n`` edits group ``n mod
    len``; their union must be ``layers``), so that each layer's room for edits (the directions a
    projector keeps, one pinned a correction) is shared by a share of the corrections only.
    Empty: every batch edits every layer in ``layers``."""
    upstream: UpstreamParams = field(default_factory=UpstreamParams)
    solver: SolverParams = field(default_factory=SolverParams)
    outer: OuterParams = field(default_factory=OuterParams)
    stats: StatsParams = field(default_factory=StatsParams)
    architecture: ArchitectureSpec | None = None
    seed: int = 0
    plan_dtype: str = "float32"
    """Precision of the planning steps' forward passes (``float32`` or ``bfloat16`` under autocast);
    the weights, the statistics and the solve keep their own precision."""
    max_passes: int = 1
    """Plan and solve again, within the batch, the requests whose target the model does not say
    after a pass (greedy decoding from the bare prompt does not begin with it), up to this many
    passes in all; each pass adds its keys to ``C_prev``. 1: the methods as published."""
    plan_chunk_requests: int = 64
    """Planning runs at most this many requests' prompts in one forward pass and adds up the
    gradients of a batch's chunks before each step: memory bounded by a chunk, the same plan."""

    def __post_init__(self) -> None:
        _require_one_of("method", self.method, METHODS)
        _require_one_of("plan_dtype", self.plan_dtype, PLAN_DTYPES)
        if not _is_increasing(self.layers):
            raise ValueError(f"layers must be a non-empty increasing list, got {list(self.layers)}")
        _require_one_of("[solver] spread", self.solver.spread, SPREADS)
        if not self.solver.accumulated_weight > 0:
            raise ValueError(f"[solver] accumulated_weight must be positive, got {self.solver.accumulated_weight}")
        if self.max_passes < 1:
            raise ValueError(f"max_passes must be at least 1, got {self.max_passes}")
        if self.plan_chunk_requests < 1:
            raise ValueError(f"plan_chunk_requests must be at least 1, got {self.plan_chunk_requests}")
        for group in self.layer_groups:
            if not _is_increasing(group):
                raise ValueError(f"each of layer_groups must be a non-empty increasing list, got {list(group)}")
        if self.layer_groups and sorted({x for g in self.layer_groups for x in g}) != list(self.layers):
            groups = [list(g) for g in self.layer_groups]
            raise ValueError(f"layer_groups {groups} must together be the layers {list(self.layers)}")

    @property
    def last_layer(self) -> int:
        return self.layers[-1]

    def layers_of_batch(self, step: int) -> tuple[int, ...]:
        """The layers the batch after ``step`` applied batches edits (see ``layer_groups``)."""
        return self.layer_groups[step % len(self.layer_groups)] if self.layer_groups else self.layers

    def with_changes(self, **changes: Any) -> EditHyperParams:
        """A copy with top-level fields replaced and nested ones given as ``{"outer": {"steps": 0}}``."""
        updates: dict[str, Any] = {}
        for key, value in changes.items():
            current = getattr(self, key)
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                updates[key] = dataclasses.replace(current, **value)
            elif key == "layers":
                updates[key] = tuple(value)
            elif key == "layer_groups":
                updates[key] = tuple(tuple(g) for g in value)
            else:
                updates[key] = value
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditHyperParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown hyperparameter section(s): {', '.join(sorted(unknown))}")
        nested: dict[str, Any] = {}
        for name, kind in (
            ("upstream", UpstreamParams),
            ("solver", SolverParams),
            ("outer", OuterParams),
            ("stats", StatsParams),
            ("architecture", ArchitectureSpec),
        ):
            if data.get(name) is not None:
                nested[name] = _build(kind, data[name], name)
        top = {k: v for k, v in data.items() if k not in nested}
        if "layers" not in top:
            raise ValueError("hyperparameters need `layers`")
        top["layers"] = tuple(int(x) for x in top["layers"])
        if "layer_groups" in top:
            top["layer_groups"] = tuple(tuple(int(x) for x in group) for group in top["layer_groups"])
        return cls(**top, **nested)

    @classmethod
    def from_file(cls, path: str | Path) -> EditHyperParams:
        """Load a file; one that sets ``extends = "base.toml"`` (relative to itself) is that base
        with its own keys laid over it, section by section."""
        return cls.from_dict(_read_layered(Path(path), ()))

    @classmethod
    def resolve(
        cls, model_type: str, n_layers: int, path: str | Path | None = None, method: str | None = None
    ) -> EditHyperParams:
        """The one resolution of an edit's hyperparameters, for the daemon and the bench: the file if
        given, else the family's defaults; ``method`` overrides. Raises ``ValueError`` (one line,
        naming the file) for a bad file, an unknown method or a layer the model does not have."""
        try:
            hparams = cls.from_file(path) if path is not None else cls.defaults_for(model_type)
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(f"{path}: {error}") from error
        if method is not None:
            hparams = hparams.with_changes(method=method)
        if hparams.last_layer >= n_layers:
            raise ValueError(f"hyperparameters edit layer {hparams.last_layer}, but the model has {n_layers}")
        return hparams

    @classmethod
    def defaults_for(cls, model_type: str) -> EditHyperParams:
        """The shipped defaults of the model's family (``engine/defaults/<family>.toml``)."""
        family = FAMILY_OF_MODEL_TYPE.get(model_type, "llama")
        text = resources.files("engine").joinpath("defaults", f"{family}.toml").read_text()
        return cls.from_dict(tomllib.loads(text))


EXTENDS_KEY = "extends"


def _require_one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _is_increasing(layers: tuple[int, ...]) -> bool:
    """Non-empty, strictly increasing: a list of layers to edit."""
    return bool(layers) and list(layers) == sorted(set(layers))


def _read_layered(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A hyperparameter file's values with its ``extends`` chain resolved (a variant names its
    base and only what it changes, so a study's files cannot drift from the file they vary)."""
    resolved = path.resolve()
    if resolved in chain:
        raise ValueError(f"{EXTENDS_KEY} forms a cycle: {' -> '.join(str(p) for p in (*chain, resolved))}")
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    base_name = data.pop(EXTENDS_KEY, None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ValueError(f"{EXTENDS_KEY} must be a file name, got {base_name!r}")
    merged = _read_layered(path.parent / base_name, (*chain, resolved))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _build(kind: type, values: dict[str, Any], section: str) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown key(s) in [{section}]: {', '.join(sorted(unknown))}")
    return kind(**values)
