"""Target planning: replaying the lower blocks changes nothing but speed; early stopping."""

from __future__ import annotations

import torch
from tiny_models import REQUESTS, tiny_hparams

from engine.editor import Editor
from engine.hooks import replay_lower_layers
from engine.planning import encode_request, optimise_plan, plan_batch, residual_injector, subject_outputs
from engine.scoring import batch_logits


def _plan(tiny, tiny_dirs, replay, max_steps=6):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    state = editor.new_state()
    encoded = [encode_request(tiny, r, state.prefixes, i) for i, r in enumerate(REQUESTS[:2])]
    pb = plan_batch(tiny, encoded, list(state.prefixes))
    h = subject_outputs(tiny, pb, 2)
    return (
        pb,
        h,
        optimise_plan(
            tiny,
            pb,
            torch.zeros_like(h),
            residual_injector(tiny, pb, 2),
            lambda d: 0.5 * (d.norm(dim=1) / h.norm(dim=1) ** 2).sum(),
            0.75 * h.norm(dim=1),
            lr=0.5,
            max_steps=max_steps,
            steps_after_success=2,
            kl_weight=0.0625,
            replay_upto=2 if replay else None,
        ),
    )


def test_replaying_lower_blocks_gives_the_same_logits(tiny, tiny_dirs):
    pb, h, _ = _plan(tiny, tiny_dirs, replay=False, max_steps=0)
    delta = torch.randn_like(h)
    with torch.no_grad(), residual_injector(tiny, pb, 2)(delta):
        full = batch_logits(tiny.model, pb.batch)
    replay = replay_lower_layers(tiny.model, tiny.spec.layers, 2, **pb.batch.inputs())
    with torch.no_grad(), replay, residual_injector(tiny, pb, 2)(delta):
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
