"""The constrained downstream update, one closed form for MEMIT, AlphaEdit and MetaKE.

All three methods change a layer by ``dW = R B`` with the operator

    B = K^T P ((K K^T + M) P + r I)^-1                      (u x d_k)

    AlphaEdit / MetaKE:  P = null-space projector of C0,  M = C_prev,              r = alpha
    MEMIT:               P = I,                            M = lambda C0 + C_prev,  r = 0

so that a comparison between them changes nothing but these three inputs. ``G = B K`` is the
share of the planned residual that the constraints let through (the realised gain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.hparams import EditHyperParams


class SolveFailed(RuntimeError):  # noqa: N818 - reads as "the solve failed"
    """The linear system was singular or produced a non-finite update."""


@dataclass(frozen=True)
class Constraint:
    """The per-layer inputs of the operator besides the keys (all float64, d_k x d_k)."""

    projector: torch.Tensor | None
    """None means the identity (MEMIT)."""
    preserved: torch.Tensor
    """``M``: what the update must leave alone, besides the batch's own keys."""
    ridge: float


def layer_constraint(
    hparams: EditHyperParams, c0_mean: torch.Tensor, projector: torch.Tensor, accumulated: torch.Tensor
) -> Constraint:
    if hparams.method == "memit":
        return Constraint(None, hparams.solver.mom2_weight * c0_mean + accumulated, 0.0)
    return Constraint(projector, accumulated, hparams.solver.alpha)


def update_operator(keys: torch.Tensor, constraint: Constraint) -> torch.Tensor:
    """``B`` for keys ``K`` (d_k x u), solved in float64; raises :class:`SolveFailed`."""
    k = keys.double()
    gram = k @ k.T + constraint.preserved
    if not (torch.isfinite(gram).all() and torch.isfinite(k).all()):
        raise SolveFailed("the constraint system has NaN or infinite values")
    eye = torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    if constraint.projector is None:
        lhs, rhs = gram + constraint.ridge * eye, k
    else:
        lhs, rhs = constraint.projector @ gram + constraint.ridge * eye, constraint.projector @ k
    try:
        b_transposed = torch.linalg.solve(lhs, rhs)
    except torch.linalg.LinAlgError as exc:
        raise SolveFailed(f"singular system in the constrained solve: {exc}") from exc
    if not torch.isfinite(b_transposed).all():
        raise SolveFailed("the constrained solve produced NaN or infinite values")
    return b_transposed.T


def weight_change(residual: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
    """``dW = R B`` (d_out x d_k) for residuals ``R`` (d_out x u)."""
    delta = residual.double() @ operator
    if not torch.isfinite(delta).all():
        raise SolveFailed("the weight change has NaN or infinite values")
    return delta
