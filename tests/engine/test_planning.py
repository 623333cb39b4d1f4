"""Target planning: replaying the lower blocks and caching the tokens before the subject change
nothing but speed; MetaKE's cached variant edits only from the subject on; early stopping;
a batch planned in chunks gets the plan of one batch."""

from __future__ import annotations

import pytest
import torch
from tiny_models import REQUESTS, biting_hparams, tiny_hparams

import engine.planning
from engine.editor import Editor
from engine.hooks import add_linear_update, replay_lower_layers
from engine.planning import (
    encode_request,
    optimise_plan,
    plan_batch,
    residual_injector,
    subject_outputs,
    virtual_update_injector,
)
from engine.prefix_cache import split_points
from engine.scoring import batch_logits


def _plan(tiny, tiny_dirs, replay, max_steps=6, cache=False, compute_dtype=None):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    state = editor.new_state()
    encoded = [encode_request(tiny, r, state.prefixes, i) for i, r in enumerate(REQUESTS[:2])]
    pb = plan_batch(tiny, encoded, list(state.prefixes))
    h = subject_outputs(tiny, [pb], 2)
    if cache:
        pb = pb.with_prefix_cache(tiny)
    return (
        pb,
        h,
        optimise_plan(
            tiny,
            [pb],
            torch.zeros_like(h),
            residual_injector(tiny, 2),
            lambda d: 0.5 * (d.norm(dim=1) / h.norm(dim=1) ** 2).sum(),
            0.75 * h.norm(dim=1),
            lr=0.5,
            max_steps=max_steps,
            steps_after_success=2,
            kl_weight=0.0625,
            replay_upto=2 if replay else None,
            compute_dtype=compute_dtype,
        ),
    )


def test_replaying_lower_blocks_gives_the_same_logits(tiny, tiny_dirs):
    pb, h, _ = _plan(tiny, tiny_dirs, replay=False, max_steps=0)
    delta = torch.randn_like(h)
    with torch.no_grad(), residual_injector(tiny, 2)(pb, delta):
        full = batch_logits(tiny.model, pb.batch)
    replay = replay_lower_layers(tiny.model, tiny.spec.layers, 2, [pb.batch.inputs()])
    with torch.no_grad(), replay, residual_injector(tiny, 2)(pb, delta):
        replayed = batch_logits(tiny.model, pb.batch)
    for a, b in zip(full, replayed, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    container = tiny.model.get_submodule(tiny.spec.layers)
    assert all(type(block).__name__ != "_Replay" for block in container)  # restored


def test_plan_is_the_same_with_and_without_replay(tiny, tiny_dirs):
    _, _, plain = _plan(tiny, tiny_dirs, replay=False)
    _, _, fast = _plan(tiny, tiny_dirs, replay=True)
    assert plain.steps == fast.steps
    assert torch.allclose(plain.delta, fast.delta, atol=1e-4, rtol=1e-4)


def test_each_request_stops_on_its_own(tiny, tiny_dirs):
    _, _, result = _plan(tiny, tiny_dirs, replay=True, max_steps=6)
    assert all(0 < s <= 6 for s in result.steps)
    assert len(result.final_nll) == 2 and all(n > 0 for n in result.final_nll)


def test_prefix_cache_gives_the_same_logits_under_the_residual_injection(tiny, tiny_dirs):
    """Catches a wrong split (positions, padding or the subject index in step coordinates)."""
    pb, h, _ = _plan(tiny, tiny_dirs, replay=False, max_steps=0)
    cached = pb.with_prefix_cache(tiny)
    assert cached.step.input_ids.shape[1] < pb.batch.input_ids.shape[1]  # it does skip tokens
    delta = torch.randn_like(h)
    with torch.no_grad(), residual_injector(tiny, 2)(pb, delta):
        full = batch_logits(tiny.model, pb.batch)
    with torch.no_grad(), residual_injector(tiny, 2)(cached, delta):
        stepped = batch_logits(tiny.model, cached.step, cached.step_inputs())
    for a, b in zip(full, stepped, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_plan_is_the_same_with_and_without_prefix_cache(tiny, tiny_dirs):
    _, _, plain = _plan(tiny, tiny_dirs, replay=True)
    _, _, fast = _plan(tiny, tiny_dirs, replay=True, cache=True)
    assert plain.steps == fast.steps
    assert torch.allclose(plain.delta, fast.delta, atol=1e-4, rtol=1e-4)


def test_cached_virtual_update_edits_only_from_the_subject_on(tiny, tiny_dirs):
    """MetaKE's cached variant is the model with the virtual update masked to positions >= split."""
    pb, h, _ = _plan(tiny, tiny_dirs, replay=False, max_steps=0)
    cached = pb.with_prefix_cache(tiny)
    weight = tiny.model.get_submodule(tiny.spec.mlp_out_of(2)).weight
    key_width = weight.shape[0] if tiny.spec.weight_transposed else weight.shape[1]
    operator = torch.randn(h.shape[0], key_width) / key_width
    delta = torch.randn_like(h)
    split = split_points(pb.batch)
    after = (torch.arange(pb.batch.input_ids.shape[1])[None, :] >= split[:, None]).float()[..., None]
    with torch.no_grad():
        update = lambda x: after * ((x.float() @ operator.T) @ delta)  # noqa: E731
        with add_linear_update(tiny.model, tiny.spec.mlp_out_of(2), update):
            masked = batch_logits(tiny.model, pb.batch)
        with virtual_update_injector(tiny, 2, operator)(pb, delta):
            everywhere = batch_logits(tiny.model, pb.batch)
            stepped = batch_logits(tiny.model, cached.step, cached.step_inputs())
    for a, b in zip(masked, stepped, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(everywhere[0], stepped[0], atol=1e-3)  # the approximation is not the model


def test_bfloat16_planning_finds_about_the_same_plan(tiny, tiny_dirs):
    """``plan_dtype = "bfloat16"``: steps under autocast, with the float32 prefix cache, stay close."""
    _, _, full = _plan(tiny, tiny_dirs, replay=True, cache=True)
    _, _, half = _plan(tiny, tiny_dirs, replay=True, cache=True, compute_dtype=torch.bfloat16)
    assert half.delta.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(full.delta, half.delta, dim=1)
    assert bool((cosine > 0.95).all()), cosine
    assert not torch.equal(full.delta, half.delta)  # it did run in another precision


@pytest.mark.parametrize("method", ["memit", "alphaedit", "metake"])
def test_a_batch_planned_in_chunks_gets_the_plan_of_one_batch(tiny, tiny_dirs, method, monkeypatch):
    """``plan_chunk_requests``: a step over chunks of 2 requests adds up to the step over all 3.
    Catches a KL or NLL normalised per chunk, one chunk's requests stopped by another's state,
    and a replay of the wrong chunk's lower blocks; and that no planning forward is wider."""
    rows_per_forward: list[int] = []
    original = engine.planning.batch_logits

    def counted(model, batch, inputs=None):
        rows_per_forward.append(batch.input_ids.shape[0])
        return original(model, batch, inputs)

    monkeypatch.setattr(engine.planning, "batch_logits", counted)
    # Both editors sample C0 from the unedited model; each batch starts from its weights.
    editors = [
        Editor(tiny, biting_hparams(tiny_dirs["corpus"], tiny.model_type, method, plan_chunk_requests=per_chunk))
        for per_chunk in (len(REQUESTS), 2)
    ]
    base = editors[0].edited_weights()
    runs = []
    for editor in editors:
        editor.load_weights(base)
        rows_per_forward.clear()
        outcome = editor.apply(REQUESTS, editor.new_state())
        steps = [(d.upstream_steps, d.outer_steps) for d in outcome.applied]
        runs.append((editor.edited_weights(), steps, max(rows_per_forward)))
    (whole, whole_steps, whole_rows), (chunked, chunked_steps, chunked_rows) = runs
    assert whole_steps == chunked_steps and any(s > 0 for pair in whole_steps for s in pair)
    assert chunked_rows < whole_rows  # each forward ran two requests' prompts, not three
    for name in whole:
        assert (whole[name] - base[name]).abs().max() > 1e-3, "the batch must move the weights"
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-5, rtol=1e-4)
