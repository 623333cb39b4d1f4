"""The constrained downstream update, one closed form for MEMIT, AlphaEdit and MetaKE.

All three methods change a layer by ``dW = R B`` with the operator

    B = K^T P ((K K^T + M) P + r I)^-1                      (u x d_k)

    AlphaEdit / MetaKE:  P = null-space projector of C0,  M = v C_prev + w C0,       r = alpha
    MEMIT:               P = I,                            M = lambda C0 + v C_prev,  r = 0

so that a comparison between them changes nothing but these three inputs. ``w`` (``[solver]
null_space_c0_weight``, 0 in AlphaEdit) prices what remains of ``C0`` inside the projector's
range; ``v`` (``[solver] accumulated_weight``, 1 in both papers) weighs the earlier corrections.
``G = B K`` is the share of the planned residual that the constraints let through (the realised
gain).

It is solved in an equivalent symmetric form. The solution of ``(P (K K^T + M) + r I) y = P K``
lies in the range of ``P`` (``r y = P (K - ...)``), so it also solves
``(S + K~ K~^T) y = K~`` with ``S = P M P + r I`` and ``K~ = P K``, and by the push-through
identity ``y = Z (I + K~^T Z)^-1`` with ``Z = S^-1 K~``. ``S`` does not depend on the batch: it
is factorised once per layer and edit (Cholesky, ``d^3 / 3``) and each solve costs ``O(d^2 u)``,
where the direct form paid a dense ``P @ gram`` product and an LU factorisation (``8 d^3 / 3``)
per solve. ``P C_prev P`` is accumulated in the editor state beside ``C_prev``, so nothing of
size ``d^3`` is recomputed from it.
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
    factor: torch.Tensor
    """Lower Cholesky factor of ``S = P M P + r I``."""

    @classmethod
    def factorise(cls, projector: torch.Tensor | None, system: torch.Tensor) -> Constraint:
        """The constraint with ``S = system`` (symmetric); raises :class:`SolveFailed` unless it is
        finite and positive definite."""
        if not torch.isfinite(system).all():
            raise SolveFailed("the constraint system has NaN or infinite values")
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info) != 0:
            raise SolveFailed(f"singular system in the constrained solve (not positive definite at {int(info)})")
        return cls(projector, factor)


def layer_constraint(
    hparams: EditHyperParams,
    c0_mean: torch.Tensor,
    projector: torch.Tensor,
    accumulated: torch.Tensor,
    projected: torch.Tensor | None = None,
    projected_c0: torch.Tensor | None = None,
) -> Constraint:
    """The constraint of one layer from ``C0``, its projector, ``C_prev`` and ``P C_prev P``
    (computed from ``C_prev`` when the state does not carry it), and ``P C0 P`` when
    ``null_space_c0_weight`` is set (computed when not given)."""
    prev = hparams.solver.accumulated_weight
    if hparams.method == "memit":
        return Constraint.factorise(None, hparams.solver.mom2_weight * c0_mean.double() + prev * accumulated.double())
    if projected is None:
        projected = project_constraint(projector, accumulated)
    eye = torch.eye(projector.shape[0], dtype=torch.float64, device=projector.device)
    system = prev * projected.double() + hparams.solver.alpha * eye
    weight = hparams.solver.null_space_c0_weight
    if weight:
        system = system + weight * (project_constraint(projector, c0_mean) if projected_c0 is None else projected_c0)
    return Constraint.factorise(projector, system)


def project_constraint(projector: torch.Tensor, accumulated: torch.Tensor) -> torch.Tensor:
    """``P C P`` in the dtype of ``C``."""
    p = projector.double()
    return (p @ accumulated.double() @ p).to(accumulated.dtype)


def projected_keys(keys: torch.Tensor, constraint: Constraint) -> torch.Tensor:
    """``K~ = P K`` (float64, d_k x u)."""
    k = keys.double()
    if not torch.isfinite(k).all():
        raise SolveFailed("the keys have NaN or infinite values")
    return k if constraint.projector is None else constraint.projector @ k


def update_operator(keys: torch.Tensor, constraint: Constraint) -> torch.Tensor:
    """``B`` for keys ``K`` (d_k x u), solved in float64; raises :class:`SolveFailed`."""
    k = projected_keys(keys, constraint)
    z = torch.cholesky_solve(k, constraint.factor)
    inner = k.T @ z + torch.eye(k.shape[1], dtype=torch.float64, device=k.device)
    try:
        operator = torch.linalg.solve(inner.mT, z.T)
    except torch.linalg.LinAlgError as exc:
        raise SolveFailed(f"singular system in the constrained solve: {exc}") from exc
    if not torch.isfinite(operator).all():
        raise SolveFailed("the constrained solve produced NaN or infinite values")
    return operator


def direct_operator(
    keys: torch.Tensor, projector: torch.Tensor | None, preserved: torch.Tensor, ridge: float
) -> torch.Tensor:
    """``B`` straight from its definition (one LU solve of the non-symmetric system): the
    reference that tests and ``benchmarks/solve_speed.py`` hold :func:`update_operator` to."""
    k = keys.double()
    gram = k @ k.T + preserved.double()
    eye = torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    if projector is None:
        return torch.linalg.solve(gram + ridge * eye, k).T
    return torch.linalg.solve(projector @ gram + ridge * eye, projector @ k).T


def weight_change(residual: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
    """``dW = R B`` (d_out x d_k) for residuals ``R`` (d_out x u)."""
    delta = residual.double() @ operator
    if not torch.isfinite(delta).all():
        raise SolveFailed("the weight change has NaN or infinite values")
    return delta


def cap_singular_values(change: torch.Tensor, cap: float) -> tuple[torch.Tensor, float]:
    """``change`` with every singular value above ``cap`` lowered to it (float64), and the share
    of ``||change||_F`` removed (0 and ``change`` itself when none is above).

    Through the eigendecomposition of the Gram matrix of the shorter side (``M M^T = U S^2 U^T``,
    capped ``M`` = ``U diag(min(s, cap) / s) U^T M``): on a 576 x 1536 layer 0.30 s against 0.48 s
    for its SVD (one thread of a loaded 2-core CPU), equal to 3e-14."""
    d = change.double()
    transpose = d.shape[0] > d.shape[1]
    m = d.T if transpose else d
    values, vectors = torch.linalg.eigh(m @ m.T)
    singular = values.clamp(min=0).sqrt()
    if not bool((singular > cap).any()):
        return d, 0.0
    scale = torch.where(singular > cap, cap / singular, torch.ones_like(singular))
    capped = vectors @ (scale[:, None] * (vectors.T @ m))
    capped = capped.T if transpose else capped
    return capped, float((d - capped).norm() / d.norm())


def largest_singular_value(matrix: torch.Tensor) -> float:
    """``sigma_max`` from the Gram matrix of the shorter side (float64)."""
    m = matrix.double()
    gram = m.T @ m if m.shape[0] > m.shape[1] else m @ m.T
    return float(torch.linalg.eigvalsh(gram)[-1].clamp(min=0).sqrt())
