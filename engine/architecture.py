"""Where the editable parts of a model live, described by module-name templates.

The editing math is the same for every decoder-only transformer; only the names of the
modules differ. A table keyed by ``config.model_type`` replaces per-family ``if`` chains, and a
hyperparameter file can describe any other architecture with the same four templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module-name templates of one architecture family (``{}`` is the layer index)."""

    layers: str
    """The container of the decoder blocks, e.g. ``model.layers``; block ``i`` is ``{layers}.{i}``."""
    mlp_out: str
    """The MLP output projection that is edited; its input at a token is the edit key."""
    final_norm: str
    lm_head: str
    weight_transposed: bool = False
    """True where the projection stores its weight as (in, out), like GPT-2's Conv1D."""

    def layer(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def mlp_out_of(self, index: int) -> str:
        return self.mlp_out.format(index)

    def edited_weight_name(self, index: int) -> str:
        """The state-dict key of the weight edited at block ``index``: the name checkpoints use."""
        return f"{self.mlp_out_of(index)}.weight"


_LLAMA_FAMILY = ArchitectureSpec(
    layers="model.layers",
    mlp_out="model.layers.{}.mlp.down_proj",
    final_norm="model.norm",
    lm_head="lm_head",
)
_GPT2_FAMILY = ArchitectureSpec(
    layers="transformer.h",
    mlp_out="transformer.h.{}.mlp.c_proj",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    weight_transposed=True,
)

KNOWN_ARCHITECTURES: MappingProxyType[str, ArchitectureSpec] = MappingProxyType(
    {
        "llama": _LLAMA_FAMILY,
        "mistral": _LLAMA_FAMILY,
        "qwen2": _LLAMA_FAMILY,
        "qwen3": _LLAMA_FAMILY,
        "gemma": _LLAMA_FAMILY,
        "gemma2": _LLAMA_FAMILY,
        "olmo": _LLAMA_FAMILY,
        "gpt2": _GPT2_FAMILY,
        "gptj": ArchitectureSpec(
            layers="transformer.h",
            mlp_out="transformer.h.{}.mlp.fc_out",
            final_norm="transformer.ln_f",
            lm_head="lm_head",
        ),
        "gpt_neox": ArchitectureSpec(
            layers="gpt_neox.layers",
            mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
            final_norm="gpt_neox.final_layer_norm",
            lm_head="embed_out",
        ),
    }
)

FAMILY_OF_MODEL_TYPE: MappingProxyType[str, str] = MappingProxyType(
    {"gpt2": "gpt2", "gptj": "gpt2", "gpt_neox": "gpt2"}
)
"""Which defaults file (``engine/defaults/<family>.toml``) a model type uses; others use ``llama``."""


class UnknownArchitectureError(ValueError):
    """The model type has no templates: the user has to provide them."""


def architecture_for(model_type: str, override: ArchitectureSpec | None = None) -> ArchitectureSpec:
    """The templates for ``model_type``, or ``override`` (from the hyperparameter file)."""
    if override is not None:
        return override
    try:
        return KNOWN_ARCHITECTURES[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown model type {model_type!r}: set [architecture] layers, mlp_out, final_norm, "
            f"lm_head (and weight_transposed) in the hyperparameter file "
            f"(known: {', '.join(sorted(KNOWN_ARCHITECTURES))})"
        ) from None


def check_templates(model: nn.Module, spec: ArchitectureSpec) -> None:
    """Raise :class:`UnknownArchitectureError` unless every template names a module of ``model``
    (at layer 0), so that wrong ``[architecture]`` settings fail at load time with one line."""
    for name in (spec.layers, spec.layer(0), spec.mlp_out_of(0), spec.final_norm, spec.lm_head):
        get_module(model, name)
    if not isinstance(getattr(get_module(model, spec.mlp_out_of(0)), "weight", None), torch.Tensor):
        raise UnknownArchitectureError(f"module {spec.mlp_out_of(0)!r} has no weight matrix to edit")


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UnknownArchitectureError(
            f"module {name!r} not found in {type(model).__name__}: check the [architecture] templates"
        ) from None


def edited_weight(model: nn.Module, spec: ArchitectureSpec, layer: int) -> torch.Tensor:
    """The weight parameter edited at ``layer``, as stored (transposed for Conv1D)."""
    return get_module(model, spec.mlp_out_of(layer)).weight


def as_out_in(weight_delta: torch.Tensor, spec: ArchitectureSpec) -> torch.Tensor:
    """Convert between the (out, in) orientation of the math and the stored orientation."""
    return weight_delta.T if spec.weight_transposed else weight_delta
