"""Choosing the edit target: the upstream plan and MetaKE's outer loop.

Both stages optimise the same thing, a residual ``delta`` per request at the output of the last
critical layer, on the same prompts (the rewrite prompt behind a few generic prefixes, plus
``"{subject} is a"`` for a KL term that keeps the subject's other properties). They differ only
in how ``delta`` reaches the model and what it costs:

- upstream (MEMIT/AlphaEdit): ``delta`` is added to the residual stream at the subject's last
  token; cost ``weight_decay * ||delta|| / ||h||^2``; ``||delta||`` clamped to a share of ``||h||``.
- outer (MetaKE): the model sees the *virtual constrained update* ``W + delta^T B`` of the last
  critical layer, i.e. only what the downstream constraints let through; cost
  ``gamma * ||delta^T B||^2 / ||W||^2``; a generous safety clamp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.hooks import add_at_positions, add_linear_update, capture_outputs, replay_lower_layers, run_until_stopped
from engine.models import LoadedModel
from engine.prefix_cache import SplitBatch, split_batch, split_points
from engine.requests import EditRequest, Row, TokenBatch, encode_target, encode_with_subject, make_batch
from engine.scoring import batch_logits, per_row_sum, target_logprobs, targets_are_top

KL_TEMPLATE = "{} is a"


@dataclass
class EncodedRequest:
    request: EditRequest
    target_ids: list[int]
    contexts: list[Row]
    """The prompt behind each prefix (the first is the bare prompt), without the target."""
    kl: Row


def encode_request(loaded: LoadedModel, request: EditRequest, prefixes: tuple[str, ...], index: int) -> EncodedRequest:
    """Tokenise a request for every prefix; raises ``RequestRejected`` if the subject can't be placed."""
    tok = loaded.tokenizer
    target_ids = encode_target(tok, request.text, request.target)
    contexts = []
    for prefix in ("", *prefixes):
        ids, pos = encode_with_subject(tok, prefix + request.prompt, request.subject)
        contexts.append(Row(ids, pos, index))
    kl_ids, kl_pos = encode_with_subject(tok, KL_TEMPLATE, request.subject)
    return EncodedRequest(request, target_ids, contexts, Row(kl_ids, kl_pos, index))


@dataclass
class PlanBatch:
    """All rows one planning step runs: rewrite rows score targets, the rest anchor a KL term."""

    batch: TokenBatch
    n_requests: int
    edit_rows: torch.Tensor
    """Rows that carry a subject (where the upstream adds ``delta``)."""
    kl_rows: torch.Tensor
    bare_rows: torch.Tensor
    """The bare rewrite prompt of each request, in request order."""
    reference: torch.Tensor
    """Log-probabilities of the unedited model at the last token of ``kl_rows``."""
    split: SplitBatch | None = None
    """When set, steps run only from each row's subject on (``engine.prefix_cache``)."""

    @property
    def step(self) -> TokenBatch:
        """The rows as one optimisation step runs them (indices in that step's coordinates)."""
        return self.split.step if self.split is not None else self.batch

    def step_inputs(self) -> dict[str, Any]:
        return self.split.inputs() if self.split is not None else {**self.batch.inputs(), "use_cache": False}

    def with_prefix_cache(self, loaded: LoadedModel) -> PlanBatch:
        """The same rows with what precedes each subject run once and cached (see ``engine.prefix_cache``).

        Exact when the plan acts only from the subject on (the upstream's residual injection); for
        MetaKE's virtual update it leaves the positions before the subject unedited.
        """
        return dataclasses.replace(self, split=split_batch(loaded.model, self.batch, split_points(self.batch)))


def plan_batch(loaded: LoadedModel, encoded: list[EncodedRequest], generic: list[str]) -> PlanBatch:
    rows: list[Row] = []
    bare: list[int] = []
    for item in encoded:
        for k, context in enumerate(item.contexts):
            if k == 0:
                bare.append(len(rows))
            rows.append(Row(context.ids, context.subject_pos, context.request, item.target_ids))
    kl_start = len(rows)
    rows.extend(item.kl for item in encoded)
    rows.extend(Row(loaded.tokenizer(text).input_ids, -1, -1) for text in generic)
    pad = loaded.tokenizer.pad_token_id or 0
    batch = make_batch(rows, pad, loaded.device)
    kl_rows = torch.arange(kl_start, len(rows), device=loaded.device)
    with torch.no_grad():
        _, at_last = batch_logits(loaded.model, batch)
    reference = F.log_softmax(at_last[kl_rows], dim=-1)
    edit_rows = torch.nonzero(batch.subject_pos >= 0).squeeze(1)
    return PlanBatch(batch, len(encoded), edit_rows, kl_rows, torch.tensor(bare, device=loaded.device), reference)


def plan_chunks(
    loaded: LoadedModel, encoded: list[EncodedRequest], generic: list[str], requests_per_chunk: int
) -> list[PlanBatch]:
    """The plan's rows as batches of at most ``requests_per_chunk`` whole requests, in request order
    (the generic rows ride with the first): one planning forward never runs more than one chunk.
    ``requests_per_chunk`` is ``EditHyperParams.plan_chunk_requests``, checked there."""
    starts = range(0, len(encoded), requests_per_chunk)
    return [
        plan_batch(loaded, encoded[start : start + requests_per_chunk], generic if start == 0 else [])
        for start in starts
    ]


@torch.no_grad()
def subject_outputs(loaded: LoadedModel, chunks: Sequence[PlanBatch], layer: int) -> torch.Tensor:
    """``h``: the output of ``layer`` at each request's subject token in its bare prompt (u x d)."""
    name = loaded.spec.layer(layer)
    outputs = []
    for pb in chunks:
        with capture_outputs(loaded.model, [name], stop_after=name) as seen:
            run_until_stopped(loaded.model.base_model, **pb.batch.inputs())
        outputs.append(seen[name][pb.bare_rows, pb.batch.subject_pos[pb.bare_rows]].float())
    return torch.cat(outputs)


@dataclass
class PlanResult:
    delta: torch.Tensor
    """u x d, detached."""
    steps: list[int]
    """Optimiser steps applied to each request."""
    final_nll: list[float]
    succeeded: list[bool]


Injector = Callable[[PlanBatch, torch.Tensor], AbstractContextManager[None]]
"""``inject(pb, delta)``: the model as the plan ``delta`` changes it, for a forward of ``pb``."""
Penalty = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _ChunkRows:
    """Which requests a chunk's rows score, and how many target tokens each row has."""

    token_count: torch.Tensor
    scored: torch.Tensor
    request_rows: torch.Tensor
    owns: torch.Tensor
    """u booleans: the requests whose rows are all in this chunk."""

    @classmethod
    def of(cls, pb: PlanBatch, u: int) -> _ChunkRows:
        batch = pb.step
        device = batch.request.device
        n_rows = batch.input_ids.shape[0]
        token_count = per_row_sum(torch.ones_like(batch.target_rows, dtype=torch.float32), batch.target_rows, n_rows)
        request_rows = batch.request.clamp(min=0)
        owns = torch.zeros(u, dtype=torch.bool, device=device)
        owns[batch.request[batch.request >= 0]] = True
        return cls(token_count, token_count > 0, request_rows, owns)

    def per_request(self, values: torch.Tensor, u: int) -> torch.Tensor:
        """Sum a per-row value over each request's scored rows (u values, zero for other chunks')."""
        return torch.zeros(u, dtype=values.dtype, device=values.device).index_add(
            0, self.request_rows[self.scored], values[self.scored]
        )


def optimise_plan(
    loaded: LoadedModel,
    chunks: Sequence[PlanBatch],
    init: torch.Tensor,
    inject: Injector,
    penalty: Penalty,
    max_norm: torch.Tensor,
    *,
    lr: float,
    max_steps: int,
    steps_after_success: int,
    kl_weight: float,
    margin: float = 0.0,
    replay_upto: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> PlanResult:
    """Adam on ``delta`` with per-request early stopping once its targets are the top prediction.

    A request counts as done ``steps_after_success`` steps after all its target tokens, on all
    its prompts, are the most likely next tokens; done requests are frozen, and the loop ends
    when every request is done or after ``max_steps``. Each step runs the ``chunks`` one after
    another and adds up their gradients before one optimiser step, so memory is bounded by a
    chunk and the plan is that of one batch (to rounding). Blocks ``0..replay_upto``, which
    ``delta`` cannot influence, are run once and replayed. ``compute_dtype`` (e.g. bfloat16) runs
    each step's forward under autocast; ``delta``, the losses and the optimiser stay float32.
    The early-stopping bookkeeping stays on the device: one host sync per chunk and step.
    """
    replay: AbstractContextManager[Callable[[int], None]] = (
        replay_lower_layers(loaded.model, loaded.spec.layers, replay_upto, [pb.step_inputs() for pb in chunks])
        if replay_upto is not None and replay_upto >= 0
        else nullcontext(lambda index: None)
    )
    with replay as select:
        u, device = init.shape[0], init.device
        delta = init.detach().clone().requires_grad_(True)
        optimiser = torch.optim.Adam([delta], lr=lr)
        steps = torch.zeros(u, dtype=torch.long, device=device)
        since_success = torch.full((u,), -1, dtype=torch.long, device=device)
        done = torch.zeros(u, dtype=torch.bool, device=device)
        succeeded = torch.zeros(u, dtype=torch.bool, device=device)
        rows = [_ChunkRows.of(pb, u) for pb in chunks]
        rows_per_request = sum((r.per_request(r.scored.float(), u) for r in rows), torch.zeros(u, device=device))
        n_kl = sum(len(pb.kl_rows) for pb in chunks)
        nll_r = torch.zeros(u, device=device)
        for _ in range(max_steps + 1):
            optimiser.zero_grad(set_to_none=True)
            for index, (pb, cr) in enumerate(zip(chunks, rows, strict=True)):
                select(index)
                batch = pb.step
                with inject(pb, delta), autocast(loaded, compute_dtype):
                    at_targets, at_last = batch_logits(loaded.model, batch, pb.step_inputs())
                row_nll = -per_row_sum(target_logprobs(at_targets, batch), batch.target_rows, len(cr.token_count))
                chunk_nll = cr.per_request(row_nll / cr.token_count.clamp(min=1), u) / rows_per_request
                nll_r = torch.where(cr.owns, chunk_nll.detach(), nll_r)
                kl = (
                    F.kl_div(F.log_softmax(at_last[pb.kl_rows], dim=-1), pb.reference, log_target=True, reduction="sum")
                    / n_kl
                )
                misses = cr.per_request((~targets_are_top(at_targets, batch, margin)).float(), u)
                active = cr.owns & ~done
                hit = active & (misses == 0)
                succeeded |= hit
                since_success += hit.long()
                done |= (hit & (since_success >= steps_after_success)) | (active & (steps >= max_steps))
                if not bool(done.all()):
                    (chunk_nll[~done].sum() + kl_weight * kl).backward()
            if bool(done.all()):
                break
            penalty(delta).backward()
            frozen = delta.detach().clone()
            optimiser.step()
            with torch.no_grad():
                delta.copy_(torch.where(done[:, None], frozen, delta))
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
                delta.mul_(scale[:, None])
            steps += (~done).long()
        return PlanResult(delta.detach(), steps.tolist(), nll_r.cpu().tolist(), succeeded.tolist())


def autocast(loaded: LoadedModel, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on the model's device, or nothing when ``dtype`` is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=loaded.device.type, dtype=dtype)


def residual_injector(loaded: LoadedModel, layer: int) -> Injector:
    """Upstream: add ``delta[r]`` to the residual stream after ``layer`` at request r's subject tokens."""

    def inject(pb: PlanBatch, delta: torch.Tensor) -> AbstractContextManager[None]:
        rows = pb.edit_rows
        positions, owners = pb.step.subject_pos[rows], pb.step.request[rows]
        return add_at_positions(loaded.model, loaded.spec.layer(layer), rows, positions, lambda: delta[owners])

    return inject


def virtual_update_injector(loaded: LoadedModel, layer: int, operator: torch.Tensor) -> Injector:
    """Outer loop: the model with ``W_layer + delta^T B`` (``operator`` is B, u x d_k), on every chunk."""
    b = operator.to(device=loaded.device, dtype=torch.float32)

    def inject(pb: PlanBatch, delta: torch.Tensor) -> AbstractContextManager[None]:
        return add_linear_update(loaded.model, loaded.spec.mlp_out_of(layer), lambda x: (x.float() @ b.T) @ delta)

    return inject
