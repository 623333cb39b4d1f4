"""The editor: one batch of requests in, changed weights and a new state out, or nothing at all.

``Editor.apply`` runs the whole locate-then-edit pipeline for MEMIT, AlphaEdit and MetaKE on one
code path: plan the target residual (upstream), optionally refine it against the virtual
constrained update (MetaKE's outer loop), then spread it over the critical layers with the
closed-form constrained solve. If anything fails, the edited weights are restored from a
snapshot and the state passed in is still the current one: a failed edit changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.architecture import as_out_in, edited_weight
from engine.files import model_key
from engine.hooks import capture_inputs, capture_outputs, run_until_stopped
from engine.hparams import EditHyperParams
from engine.models import LoadedModel, seeded
from engine.planning import (
    EncodedRequest,
    PlanBatch,
    encode_request,
    optimise_plan,
    plan_chunks,
    residual_injector,
    subject_outputs,
    virtual_update_injector,
)
from engine.projector import Projector, pinned_directions, projector_for
from engine.requests import EditRequest, RequestRejected, check_request, make_batch
from engine.scoring import FactScores, fact_scores, targets_said
from engine.solver import (
    SolveFailed,
    cap_singular_values,
    largest_singular_value,
    layer_constraint,
    project_constraint,
    projected_keys,
    update_operator,
    weight_change,
)
from engine.state import EditorState
from engine.stats import KeyStatistics, key_statistics

_PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


class EditFailed(RuntimeError):  # noqa: N818 - reads as "the edit failed"
    """The batch could not be applied; weights and state are exactly as before."""


@dataclass
class RequestDiagnostics:
    key: str | None
    planned_norm: float
    """``||delta||`` of the final plan."""
    plan_ratio: float
    """``||delta|| / ||h||``."""
    realised_gain: float
    """``G_ii``: the share of the plan the constrained update of the last layer realises."""
    realised_norm: float
    upstream_steps: int
    outer_steps: int
    pre: FactScores
    """How the model answered the request's prompts before the batch."""
    post: FactScores
    passes: int = 1
    """Plans and solves the request took (``max_passes``); the figures above are the first's."""
    says: bool = False
    """After the batch, greedy decoding from the bare prompt begins with the target."""


@dataclass
class EditOutcome:
    state: EditorState
    """The state after the batch (the input state when nothing was applied)."""
    applied: list[RequestDiagnostics] = field(default_factory=list)
    rejected: list[tuple[EditRequest, str]] = field(default_factory=list)
    weight_change: dict[int, float] = field(default_factory=dict)
    """``||dW||_F`` per layer."""
    relative_weight_change: dict[int, float] = field(default_factory=dict)
    restrained: dict[int, float] = field(default_factory=dict)
    """With ``[solver] spectral_cap``: per layer, the share of ``||W - W0||`` the cap removed (the
    largest over the batch's passes)."""
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Laps:
    """Seconds per phase of one batch, added up over its passes."""

    seconds: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.clock
        self.clock = now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": sum(self.seconds.values())}


@dataclass
class _Pass:
    """What one plan and solve of a batch wrote: per layer ``K K^T`` (and ``(P C_prev P, (P K)(P K)^T)``
    for the projector methods) for the state, ``dW``, the share the cap removed and ``||W||``, and per
    request the plan's figures for :class:`RequestDiagnostics`."""

    added: dict[int, torch.Tensor] = field(default_factory=dict)
    added_projected: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    changes: dict[int, torch.Tensor] = field(default_factory=dict)
    restrained: dict[int, float] = field(default_factory=dict)
    weight_norms: dict[int, float] = field(default_factory=dict)
    """``||W||`` of each layer right after its update (before the cap)."""
    figures: list[dict[str, Any]] = field(default_factory=list)


class Editor:
    """Edits one loaded model with fixed hyperparameters and cached ``C0`` / projectors."""

    def __init__(self, loaded: LoadedModel, hparams: EditHyperParams, cache_dir: Path | None = None) -> None:
        if hparams.last_layer >= loaded.n_layers:
            raise ValueError(f"layer {hparams.last_layer} does not exist: the model has {loaded.n_layers} layers")
        self.loaded = loaded
        self.hparams = hparams
        self.stats: dict[int, KeyStatistics] = key_statistics(loaded, hparams.layers, hparams.stats, cache_dir)
        model_dir = cache_dir / model_key(loaded.identity) if cache_dir else None
        self.projectors: dict[int, Projector] = {
            layer: projector_for(
                self.stats[layer], hparams.solver.nullspace_threshold, model_dir, hparams.solver.nullspace_relative
            )
            for layer in hparams.layers
        }
        device = loaded.device
        self._c0 = {layer: s.mean.to(device) for layer, s in self.stats.items()}
        self._projector = {layer: p.matrix.to(device) for layer, p in self.projectors.items()}
        self._projected_c0 = (
            {layer: project_constraint(self._projector[layer], self._c0[layer]).double() for layer in hparams.layers}
            if hparams.solver.null_space_c0_weight and hparams.method != "memit"
            else {}
        )
        self._plan_dtype = None if hparams.plan_dtype == "float32" else getattr(torch, hparams.plan_dtype)
        self._base_top: dict[int, tuple[torch.Tensor, float]] = {}
        """Per layer, ``W0`` of the states seen and its largest singular value (the spectral cap's scale)."""

    @property
    def key_width(self) -> int:
        return int(next(iter(self._c0.values())).shape[0])

    def state_settings(self) -> dict[str, str]:
        """What the accumulated constraints and every later edit depend on besides ``C0`` and the
        projectors: the method and its solver's settings (a state refuses to continue under others)."""
        solver = self.hparams.solver
        groups = [list(group) for group in self.hparams.layer_groups]
        return {
            "method": self.hparams.method,
            "alpha": repr(solver.alpha),
            "mom2_weight": repr(solver.mom2_weight),
            "nullspace_threshold": repr(solver.nullspace_threshold),
            "nullspace_relative": str(solver.nullspace_relative).lower(),
            # Only when set, so that states saved before the setting existed still continue.
            **({"null_space_c0_weight": repr(solver.null_space_c0_weight)} if solver.null_space_c0_weight else {}),
            **({"accumulated_weight": repr(solver.accumulated_weight)} if solver.accumulated_weight != 1.0 else {}),
            **({"layer_groups": json.dumps(groups)} if groups else {}),
        }

    def new_state(self) -> EditorState:
        """The state of a model nobody has edited yet (with its context prefixes chosen once)."""
        up = self.hparams.upstream
        return EditorState.fresh(
            self.loaded.identity,
            self.hparams.layers,
            self.key_width,
            self.loaded.device,
            {layer: s.sha256 for layer, s in self.stats.items()},
            {layer: p.sha256 for layer, p in self.projectors.items()},
            generate_prefixes(self.loaded, up.n_prefixes, up.prefix_tokens, self.hparams.seed),
            self.state_settings(),
            projected=self.hparams.method != "memit",
            base=self.edited_layer_weights() if self.hparams.solver.spectral_cap else None,
        )

    def edited_layer_weights(self) -> dict[int, torch.Tensor]:
        """:meth:`edited_weights` keyed by layer, as the state keeps ``W0`` (copies)."""
        by_name = self.edited_weights()
        return {layer: by_name[self.loaded.spec.edited_weight_name(layer)] for layer in self.hparams.layers}

    def check_state(self, state: EditorState) -> None:
        """Raise ``StateMismatch`` unless ``state`` can continue on this model under these settings."""
        state.check_compatible(
            self.loaded.identity,
            self.hparams.layers,
            {layer: s.sha256 for layer, s in self.stats.items()},
            {layer: p.sha256 for layer, p in self.projectors.items()},
            self.state_settings(),
        )

    def edited_weights(self) -> dict[str, torch.Tensor]:
        """The current edited weights by module name (copies, never views of the live model)."""
        return snapshot_weights(self.loaded, self.hparams.layers)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy saved edited weights into the live model (exactly, in place)."""
        restore_weights(self.loaded, self.hparams.layers, weights)

    def apply(self, requests: list[EditRequest], state: EditorState) -> EditOutcome:
        """Edit the model with ``requests`` as one batch; raises :class:`EditFailed` after a full rollback."""
        self.check_state(state)
        outcome = EditOutcome(state)
        encoded: list[EncodedRequest] = []
        for request in requests:
            try:
                encoded.append(self._encode(request, state, len(encoded)))
            except RequestRejected as exc:
                outcome.rejected.append((request, str(exc)))
        if not encoded:
            return outcome
        snapshot = self.edited_weights()
        try:
            self._apply(encoded, state, outcome)
        except (SolveFailed, EditFailed, torch.linalg.LinAlgError, RuntimeError) as exc:
            self.load_weights(snapshot)
            outcome.state = state
            raise EditFailed(f"edit rolled back: {exc}") from exc
        except BaseException:
            self.load_weights(snapshot)
            raise
        return outcome

    def _apply(self, encoded: list[EncodedRequest], state: EditorState, outcome: EditOutcome) -> None:
        """Pass after pass over the requests the model does not say yet (``max_passes``), one
        step of the state in all: each pass adds its keys to ``C_prev`` and counts no new edit."""
        hp = self.hparams
        lm = self.loaded
        layers = hp.layers_of_batch(state.steps)
        laps = _Laps()
        requests = [e.request for e in encoded]
        pre = fact_scores(lm.model, lm.tokenizer, requests)
        laps.lap("scoring")

        u = len(encoded)
        current, batch, pending = state, encoded, list(range(u))
        passes = [0] * u
        first: _Pass | None = None
        changes: dict[int, torch.Tensor] = {}
        while True:
            done = self._pass(batch, current, layers, laps)
            first = first or done
            for layer, change in done.changes.items():
                changes[layer] = changes[layer] + change if layer in changes else change
            for layer, share in done.restrained.items():
                outcome.restrained[layer] = max(outcome.restrained.get(layer, 0.0), share)
            current = current.after_batch(done.added, 0, done.added_projected)
            for i in pending:
                passes[i] += 1
            said = targets_said(lm.model, lm.tokenizer, requests)
            laps.lap("scoring")
            pending = [i for i in range(u) if not said[i] and passes[i] < hp.max_passes]
            if not pending:
                break
            batch = [self._encode(requests[i], state, j) for j, i in enumerate(pending)]

        for layer, change in changes.items():
            outcome.weight_change[layer] = float(change.norm())
            outcome.relative_weight_change[layer] = float(change.norm() / (done.weight_norms[layer] + 1e-12))
        post = fact_scores(lm.model, lm.tokenizer, requests)
        laps.lap("scoring")
        assert first is not None
        for r, item in enumerate(encoded):
            outcome.applied.append(
                RequestDiagnostics(
                    key=item.request.key, **first.figures[r], pre=pre[r], post=post[r], passes=passes[r], says=said[r]
                )
            )
        outcome.state = dataclasses.replace(current, steps=state.steps + 1, edits=state.edits + u)
        outcome.seconds = laps.total()

    def _pass(self, encoded: list[EncodedRequest], state: EditorState, layers: tuple[int, ...], laps: _Laps) -> _Pass:
        """One plan and constrained solve of ``encoded`` on the model as it is, written into the weights."""
        hp = self.hparams
        lm = self.loaded
        last = layers[-1]
        chunks = plan_chunks(lm, encoded, [], hp.plan_chunk_requests)
        h = subject_outputs(lm, chunks, last)
        u = len(encoded)
        projected = self._projected_constraints(state)
        constraints = {
            layer: layer_constraint(
                hp,
                self._c0[layer],
                self._projector[layer],
                state.constraints[layer],
                projected.get(layer),
                self._projected_c0.get(layer),
            )
            for layer in layers
        }
        keys_last, _ = self._keys_and_outputs(encoded, last, last)
        operator_last = update_operator(keys_last, constraints[last])
        laps.lap("plan_setup")

        outer_on = hp.method == "metake" and hp.outer.steps > 0
        delta = torch.zeros_like(h)
        upstream_steps = [0] * u
        if not outer_on or hp.outer.warm_start:
            up = hp.upstream
            up_chunks = [pb.with_prefix_cache(lm) for pb in chunks] if up.cache_prefix else chunks
            upstream = optimise_plan(
                lm,
                up_chunks,
                delta,
                residual_injector(lm, last),
                lambda d: up.weight_decay * (d.norm(dim=1) / h.norm(dim=1) ** 2).sum(),
                up.clamp_norm_factor * h.norm(dim=1),
                lr=up.lr,
                max_steps=up.max_steps,
                steps_after_success=up.steps_after_success,
                kl_weight=up.kl_factor,
                replay_upto=last,
                compute_dtype=self._plan_dtype,
            )
            delta, upstream_steps = upstream.delta, upstream.steps
            laps.lap("upstream")

        outer_steps = [0] * u
        if outer_on:
            generic = list(state.prefixes) if hp.outer.generic_kl else []
            outer_chunks = plan_chunks(lm, encoded, generic, hp.plan_chunk_requests) if generic else chunks
            if hp.outer.cache_prefix:
                outer_chunks = [pb.with_prefix_cache(lm) for pb in outer_chunks]
            delta, outer_steps = self._outer_loop(outer_chunks, delta, h, operator_last, last)
            laps.lap("outer")
        if not torch.isfinite(delta).all():
            raise EditFailed("the planned target has NaN or infinite values")

        gain = operator_last @ keys_last.double()
        realised = delta.double().T @ gain
        virtual_target = outer_on and hp.outer.spread_virtual_target
        targets = h + realised.T.to(h.dtype) if virtual_target else h + delta
        even = hp.solver.spread == "even"
        done = _Pass()
        for i, layer in enumerate(layers):
            keys, current = self._keys_and_outputs(encoded, layer, last)
            operator = update_operator(keys, constraints[layer])
            share = (targets - current).T / (len(layers) - i)
            if even or (virtual_target and layer == last):
                residual = gap_closing_residual(share, operator @ keys.double())
            else:
                residual = share
            change = weight_change(residual, operator)
            weight = edited_weight(lm.model, lm.spec, layer)
            with torch.no_grad():
                weight.add_(as_out_in(change, lm.spec).to(weight.dtype))
            if not torch.isfinite(weight).all():
                raise EditFailed(f"layer {layer} has non-finite weights after the update")
            done.added[layer] = keys.double() @ keys.double().T
            if layer in projected:
                seen = projected_keys(keys, constraints[layer])
                done.added_projected[layer] = (projected[layer], seen @ seen.T)
            done.changes[layer] = change
            done.weight_norms[layer] = float(weight.double().norm())
        laps.lap("solve")
        if hp.solver.spectral_cap:
            done.restrained = self._restrain(state, layers)
            laps.lap("restrain")
        done.figures = [
            {
                "planned_norm": float(delta[r].norm()),
                "plan_ratio": float(delta[r].norm() / h[r].norm()),
                "realised_gain": float(gain[r, r]),
                "realised_norm": float(realised[:, r].norm()),
                "upstream_steps": upstream_steps[r],
                "outer_steps": outer_steps[r],
            }
            for r in range(u)
        ]
        return done

    def _restrain(self, state: EditorState, layers: tuple[int, ...]) -> dict[int, float]:
        """Cap the singular values of the accumulated change ``W - W0`` of each of ``layers`` (the
        ones the batch changed; the others are capped already) at ``spectral_cap`` x ``W0``'s
        largest, in place; per layer the share of the change removed."""
        if set(state.base) != set(self.hparams.layers):
            raise EditFailed(
                "the spectral cap needs the unedited weights in the editor state, and this state has none "
                "(it was started without the cap): start a new life with it, or turn it off"
            )
        removed = {}
        for layer in layers:
            weight = edited_weight(self.loaded.model, self.loaded.spec, layer)
            base = state.base[layer].to(weight.device).double()
            cached = self._base_top.get(layer)
            if cached is None or not torch.equal(cached[0], state.base[layer]):  # W0 is the same all life
                cached = self._base_top[layer] = (state.base[layer], largest_singular_value(base))
            cap = self.hparams.solver.spectral_cap * cached[1]
            capped, removed[layer] = cap_singular_values(weight.double() - base, cap)
            if removed[layer]:
                with torch.no_grad():
                    weight.copy_((base + capped).to(weight.dtype))
        return removed

    def room_used(self, state: EditorState) -> dict[int, float]:
        """Per layer, the share of its room for edits that ``state``'s corrections have pinned.

        The room is the projector's kept directions (all ``d_k`` for MEMIT, which has none); a
        direction is pinned when the protected constraint (``P C_prev P``, MEMIT's ``C_prev``, times
        ``accumulated_weight``) weighs it more than the ridge ``alpha``. Near 1, a layer has no free
        direction left and each new correction trades against the old ones."""
        self.check_state(state)
        projected = self._projected_constraints(state)
        alpha = self.hparams.solver.alpha / self.hparams.solver.accumulated_weight  # v C pins past alpha
        used = {}
        for layer in self.hparams.layers:
            constraint = projected.get(layer, state.constraints[layer])
            room = self.projectors[layer].kept if projected else self.key_width
            used[layer] = pinned_directions(constraint, alpha) / room if room else 1.0
        return used

    def refusal(self, request: EditRequest, state: EditorState) -> str | None:
        """Why :meth:`apply` would refuse ``request`` with ``state`` (the reason it records), or
        None: a refusal depends only on the request, the tokenizer and the state's prefixes."""
        try:
            self._encode(request, state, 0)
        except RequestRejected as exc:
            return str(exc)
        return None

    def _encode(self, request: EditRequest, state: EditorState, index: int) -> EncodedRequest:
        check_request(request)
        return encode_request(self.loaded, request, state.prefixes, index)

    def rekey(self, state: EditorState, requests: list[EditRequest], chunk: int = 64) -> EditorState:
        """``state`` with ``C_prev`` (and ``P C_prev P``) rebuilt from the keys ``requests`` have on
        the model *now*; ``requests`` are every request ``state`` has applied.

        ``C_prev`` holds each request's keys as they were when it was applied, but the critical
        layers are edited together, so every later change below a layer moves the keys that layer
        reads: after 1,500 more AlphaEdit edits of SmolLM2 the first 100 subjects' keys at layer 8
        had moved by half their norm (docs/lifelong.md). A re-keyed state protects what the earlier
        corrections' subjects read now. The first critical layer's keys never move (nothing below
        it is edited), so its ``C_prev`` is rebuilt as it was."""
        self.check_state(state)
        if self.hparams.layer_groups:
            raise ValueError("re-keying routed layers is not supported (a layer's C_prev holds its group's requests)")
        if len(requests) != state.edits:
            raise ValueError(f"re-keying needs the {state.edits} requests the state applied, not {len(requests)}")
        encoded = [encode_request(self.loaded, r, state.prefixes, i) for i, r in enumerate(requests)]
        constraints: dict[int, torch.Tensor] = {}
        projected: dict[int, torch.Tensor] = {}
        for layer in self.hparams.layers:
            gram = torch.zeros(self.key_width, self.key_width, dtype=torch.float64, device=self.loaded.device)
            for start in range(0, len(encoded), chunk):
                keys = self._keys_and_outputs(encoded[start : start + chunk], layer, layer)[0].double()
                gram += keys @ keys.T
            constraints[layer] = gram.to(state.constraints[layer])
            if layer in state.projected:
                projected[layer] = project_constraint(self._projector[layer], gram).to(state.projected[layer])
        return dataclasses.replace(state, constraints=constraints, projected=projected)

    def _projected_constraints(self, state: EditorState) -> dict[int, torch.Tensor]:
        """``P C_prev P`` per layer for the projector methods (MEMIT has none): the state's, or
        computed from ``C_prev`` for a state saved before it carried them."""
        if self.hparams.method == "memit":
            return {}
        return {
            layer: state.projected[layer]
            if layer in state.projected
            else project_constraint(self._projector[layer], state.constraints[layer])
            for layer in self.hparams.layers
        }

    def _outer_loop(
        self, chunks: list[PlanBatch], delta: torch.Tensor, h: torch.Tensor, operator: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, list[int]]:
        """MetaKE: refine the plan against the virtual update ``W + delta^T B`` of the last layer."""
        outer = self.hparams.outer
        weight_norm_sq = edited_weight(self.loaded.model, self.loaded.spec, layer).double().norm() ** 2
        b = operator.float()
        scale = float(outer.gamma / weight_norm_sq)

        def price(d: torch.Tensor) -> torch.Tensor:
            return scale * (d.T @ b).pow(2).sum()

        result = optimise_plan(
            self.loaded,
            chunks,
            delta,
            virtual_update_injector(self.loaded, layer, operator),
            price,
            outer.safety_clamp_factor * h.norm(dim=1),
            lr=outer.lr if outer.warm_start else outer.lr_zero_start,
            max_steps=outer.steps if outer.warm_start else self.hparams.upstream.max_steps,
            steps_after_success=outer.steps_after_success,
            kl_weight=outer.beta,
            margin=outer.target_margin,
            replay_upto=layer - 1,
            compute_dtype=self._plan_dtype,
        )
        return result.delta, result.steps

    @torch.no_grad()
    def _keys_and_outputs(
        self, encoded: list[EncodedRequest], layer: int, last: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys at ``layer`` (d_k x u, averaged over prefixes) and ``last``'s output at the bare prompts (u x d)."""
        lm = self.loaded
        rows = [context for item in encoded for context in item.contexts]
        batch = make_batch(rows, lm.tokenizer.pad_token_id or 0, lm.device)
        key_name, out_name = lm.spec.mlp_out_of(layer), lm.spec.layer(last)
        with (
            capture_inputs(lm.model, [key_name]) as inputs,
            capture_outputs(lm.model, [out_name], stop_after=out_name) as outputs,
        ):
            run_until_stopped(lm.model.base_model, **batch.inputs())
        at_subject = inputs[key_name][batch.rows, batch.subject_pos].float()
        n_ctx = len(encoded[0].contexts)
        keys = at_subject.reshape(len(encoded), n_ctx, -1).mean(dim=1).T
        bare = torch.arange(0, len(rows), n_ctx, device=lm.device)
        current = outputs[out_name][bare, batch.subject_pos[bare]].float()
        return keys, current


def gap_closing_residual(gap: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """The residual ``R`` (d x u) whose constrained update realises ``gap`` (d x u) at the batch's
    keys, ``R G = gap`` for the layer's gain ``G = B K`` (u x u, float64): exactly when ``G`` is
    invertible, in the least-squares sense when it is not (two requests about one subject share a
    key, so their gaps can only be met on average)."""
    residual = gap.double() @ torch.linalg.pinv(gain, rtol=1e-6)
    if not torch.isfinite(residual).all():
        raise SolveFailed("a layer's gap-closing residual has NaN or infinite values")
    return residual


def snapshot_weights(loaded: LoadedModel, layers: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The weights edited at ``layers`` by module name (copies; no statistics are needed for this)."""
    spec = loaded.spec
    return {
        spec.edited_weight_name(layer): edited_weight(loaded.model, spec, layer).detach().clone() for layer in layers
    }


def restore_weights(loaded: LoadedModel, layers: tuple[int, ...], weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (from :func:`snapshot_weights`) into the live model, exactly, in place."""
    spec = loaded.spec
    with torch.no_grad():
        for layer in layers:
            name = spec.edited_weight_name(layer)
            if name not in weights:
                raise KeyError(f"weights for {name} are missing")
            edited_weight(loaded.model, spec, layer).copy_(weights[name])


@torch.no_grad()
def generate_prefixes(loaded: LoadedModel, n: int, length: int, seed: int) -> tuple[str, ...]:
    """Short generic text prefixes sampled from the model (MEMIT's context templates), seeded."""
    if n == 0:
        return ()
    tok = loaded.tokenizer
    starts = [_PREFIX_STARTS[i % len(_PREFIX_STARTS)] for i in range(n)]
    enc = tok(starts, return_tensors="pt", padding=True, padding_side="left").to(loaded.device)
    with seeded(loaded.device, seed):
        out = loaded.model.generate(
            **enc, do_sample=True, top_k=5, max_new_tokens=length, min_new_tokens=length, pad_token_id=tok.pad_token_id
        )
    texts = tok.batch_decode(out, skip_special_tokens=True)
    return tuple(" ".join(t.replace("{", " ").replace("}", " ").split()) + ". " for t in texts)
