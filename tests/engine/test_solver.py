"""The closed-form constrained update: null-space property, method equivalences, failures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import DEVICE, REQUESTS, tiny_hparams

from engine.editor import EditFailed, Editor
from engine.models import load_model
from engine.requests import EditRequest
from engine.solver import (
    Constraint,
    SolveFailed,
    cap_singular_values,
    direct_operator,
    layer_constraint,
    project_constraint,
    update_operator,
    weight_change,
)


def _weights(editor: Editor) -> dict[str, torch.Tensor]:
    return editor.edited_weights()


def test_alphaedit_update_leaves_preserved_keys_unchanged(tiny, tiny_dirs):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    before = _weights(editor)
    outcome = editor.apply(REQUESTS[:2], editor.new_state())
    assert len(outcome.applied) == 2
    after = _weights(editor)
    torch.manual_seed(1)
    for layer in editor.hparams.layers:
        name = tiny.spec.edited_weight_name(layer)
        change = (after[name] - before[name]).double().cpu()
        change = change.T if tiny.spec.weight_transposed else change  # (out, in)
        projector = editor.projectors[layer].matrix.cpu()
        preserved = (torch.eye(projector.shape[0], dtype=torch.float64) - projector) @ torch.randn(
            projector.shape[0], 16, dtype=torch.float64
        )
        assert 0 < editor.projectors[layer].kept < projector.shape[0]
        assert change.norm() > 0
        # The stored weights are float32, so the change carries rounding of about eps32 * ||W||
        # (~1e-5 of ||dW|| here); a random update of the same shape leaks ~0.1.
        leak = (change @ preserved).norm() / (change.norm() * preserved.norm())
        unprojected = torch.randn_like(change)
        baseline = (unprojected @ preserved).norm() / (unprojected.norm() * preserved.norm())
        assert leak < 1e-3 < 0.03 < baseline, f"layer {layer}: leak {leak}, baseline {baseline}"


def test_metake_without_outer_loop_gives_alphaedits_weights_and_state(tiny_dirs):

    results = []
    variants = (
        ("alphaedit", {}),
        ("metake", {"outer": {"steps": 0}}),
        ("metake", {"outer": {"steps": 0, "spread_virtual_target": True}}),
    )
    for method, changes in variants:
        loaded = load_model(tiny_dirs["llama"], device=DEVICE)
        editor = Editor(loaded, tiny_hparams(tiny_dirs["corpus"], method, **changes))
        state = editor.new_state()
        for request in REQUESTS:
            state = editor.apply([request], state).state
        results.append((editor.edited_weights(), state))
    (w_alpha, s_alpha), *metakes = results
    for w_meta, s_meta in metakes:
        assert all(torch.equal(w_alpha[k].cpu(), w_meta[k].cpu()) for k in w_alpha)
        # the states differ only in the method they record (a state refuses to continue under another)
        assert {k for k in s_alpha.settings if s_alpha.settings[k] != s_meta.settings[k]} == {"method"}
        assert s_alpha.equals(dataclasses.replace(s_meta, settings=s_alpha.settings))


def test_metake_outer_loop_plans_under_the_virtual_update(tiny_dirs):
    """Off: AlphaEdit's upstream plan. Zero start (default): the outer loop does the planning.
    Warm start: the upstream plan, then outer steps (here all of them, the margin being unreachable)."""
    results = {}
    for name, outer in (
        ("off", {"steps": 0}),
        ("zero", {"steps": 4}),
        ("warm", {"steps": 4, "warm_start": True, "target_margin": 50.0}),
    ):
        loaded = load_model(tiny_dirs["llama"], device=DEVICE)
        editor = Editor(loaded, tiny_hparams(tiny_dirs["corpus"], "metake", outer=outer))
        diag = editor.apply(REQUESTS[:1], editor.new_state()).applied[0]
        results[name] = (diag.upstream_steps, diag.outer_steps, editor.edited_weights())
    assert results["off"][0] > 0 and results["off"][1] == 0
    assert results["zero"][0] == 0 and results["zero"][1] > 0
    assert results["warm"][0] > 0 and results["warm"][1] == 4
    off, zero, warm = (results[k][2] for k in ("off", "zero", "warm"))
    assert any(not torch.equal(off[k], zero[k]) for k in off)
    assert any(not torch.equal(off[k], warm[k]) for k in off)


def test_memit_gain_is_below_alphaedit_gain(tiny_dirs):
    """MEMIT's lambda C0 suppresses the realised share of the plan; AlphaEdit's projector less so."""

    gains = {}
    for method in ("memit", "alphaedit"):
        loaded = load_model(tiny_dirs["llama"], device=DEVICE)
        editor = Editor(loaded, tiny_hparams(tiny_dirs["corpus"], method))
        gains[method] = editor.apply(REQUESTS[:1], editor.new_state()).applied[0].realised_gain
    assert 0 < gains["memit"] < gains["alphaedit"] < 1


def test_singular_system_raises_solve_failed():
    zeros = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(SolveFailed, match="singular"):
        Constraint.factorise(None, zeros)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(4, 24),
    u=st.integers(1, 6),
    earlier=st.integers(0, 40),
    null=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_symmetric_solve_equals_the_methods_closed_form(d, u, earlier, null, seed):
    """AlphaEdit/MetaKE (projector, C_prev accumulated as P C_prev P) and MEMIT (lambda C0 +
    C_prev, no projector) give the direct formula's operator, for any keys and history, with
    ``null_space_c0_weight`` and ``accumulated_weight`` too."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    kept = basis[:, : max(1, int(null * d))]
    projector = kept @ kept.T
    history = torch.randn(d, earlier, generator=gen, dtype=torch.float64) * 3
    c_prev = history @ history.T
    keys = torch.randn(d, u, generator=gen, dtype=torch.float64) * 3
    alphaedit = tiny_hparams(Path("unused"), "alphaedit")
    got = update_operator(keys, layer_constraint(alphaedit, c_prev, projector, c_prev))
    want = direct_operator(keys, projector, c_prev, alphaedit.solver.alpha)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10 * float(want.abs().max()) + 1e-14)
    # the state's accumulated P C_prev P gives the same operator as projecting C_prev here
    accumulated = layer_constraint(alphaedit, c_prev, projector, c_prev, project_constraint(projector, c_prev))
    assert torch.allclose(update_operator(keys, accumulated), got, rtol=1e-10, atol=1e-14)
    c0 = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    c0 = c0 @ c0.T / (2 * d)
    memit = tiny_hparams(Path("unused"), "memit")
    got = update_operator(keys, layer_constraint(memit, c0, projector, c_prev))
    want = direct_operator(keys, None, memit.solver.mom2_weight * c0 + c_prev, 0.0)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10 * float(want.abs().max()) + 1e-14)
    # a price on C0 inside the projector's range is M = C_prev + w C0 in the same closed form
    priced = alphaedit.with_changes(solver={"null_space_c0_weight": 7.0})
    got = update_operator(keys, layer_constraint(priced, c0, projector, c_prev))
    want = direct_operator(keys, projector, c_prev + 7.0 * c0, alphaedit.solver.alpha)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10 * float(want.abs().max()) + 1e-14)
    # a weight on the earlier corrections is M = v C_prev, for both kinds of method
    for method, m, projected, ridge in (
        (alphaedit, 3.0 * c_prev, projector, alphaedit.solver.alpha),
        (memit, memit.solver.mom2_weight * c0 + 3.0 * c_prev, None, 0.0),
    ):
        weighted = method.with_changes(solver={"accumulated_weight": 3.0})
        got = update_operator(keys, layer_constraint(weighted, c0, projector, c_prev))
        want = direct_operator(keys, projected, m, ridge)
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-10 * float(want.abs().max()) + 1e-14)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(4, 16),
    steps=st.integers(2, 6),
    u=st.integers(1, 3),
    null=st.floats(0.3, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_life_of_edits_is_one_regularised_fit_of_all_of_them(d, steps, u, null, seed):
    """Sequential solves with ``C_prev`` accumulated are recursive least squares: the summed
    change is the one batch fit of every edit's target at once, ``argmin alpha ||D||^2 (+ w tr(D C0
    D^T)) + sum_i ||D k_i - r_i||^2`` over the projector's range (MEMIT: ``lambda tr(D C0 D^T)``).
    So the ridge already anchors the *total* change to the unedited weights, not each increment
    (docs/lifelong.md, "Norm anchoring is already in the method")."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    kept = basis[:, : max(1, int(null * d))]
    projector = kept @ kept.T
    c0 = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    c0 = c0 @ c0.T / (2 * d)
    keys = [torch.randn(d, u, generator=gen, dtype=torch.float64) * 3 for _ in range(steps)]
    targets = [torch.randn(5, u, generator=gen, dtype=torch.float64) for _ in range(steps)]
    alphaedit = tiny_hparams(Path("unused"), "alphaedit")
    variants = (
        alphaedit,
        alphaedit.with_changes(solver={"null_space_c0_weight": 7.0}),
        tiny_hparams(Path("u"), "memit"),
    )
    for hp in variants:
        change, c_prev = torch.zeros(5, d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        for k, r in zip(keys, targets, strict=True):
            # each edit solves for what is still missing at its keys, under the constraints so far
            change = change + weight_change(
                r - change @ k, update_operator(k, layer_constraint(hp, c0, projector, c_prev))
            )
            c_prev = c_prev + k @ k.T
        everything = torch.cat(keys, dim=1)
        none_before = torch.zeros(d, d, dtype=torch.float64)
        batch = weight_change(
            torch.cat(targets, dim=1), update_operator(everything, layer_constraint(hp, c0, projector, none_before))
        )
        assert torch.allclose(change, batch, rtol=1e-7, atol=1e-9 * float(batch.abs().max()) + 1e-12), hp.method


def test_nan_in_the_solve_rolls_back_weights_and_state(tiny, tiny_dirs):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    state = editor.new_state()
    poisoned = state.after_batch(
        {layer: torch.full_like(state.constraints[layer], float("nan")) for layer in state.layers}, 0
    )
    before = editor.edited_weights()
    with pytest.raises(EditFailed, match="NaN or infinite"):
        editor.apply(REQUESTS[:1], poisoned)
    after = editor.edited_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert poisoned.steps == 1 and bool(torch.isnan(poisoned.constraints[1]).all())


def test_request_the_tokenizer_cannot_place_is_rejected_and_nothing_changes(tiny, tiny_dirs):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    state = editor.new_state()
    before = editor.edited_weights()
    bad = EditRequest("{}is is a city", "Par", "Rome")  # "Paris" is one token: "Par" has no last token of its own
    outcome = editor.apply([bad], state)
    assert outcome.applied == []
    assert len(outcome.rejected) == 1 and "cannot be located" in outcome.rejected[0][1]
    assert outcome.state is state
    after = editor.edited_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (EditRequest("The capital of France is", "France", "Rome"), "exactly one '{}'"),
        (EditRequest("{} and {} are", "France", "Rome"), "exactly one '{}'"),
        (EditRequest("The capital of {} is", "France", "   "), "target is empty"),
        (EditRequest("The capital of {} is", "Fra\x07nce", "Rome"), "control characters"),
    ],
)
def test_malformed_requests_are_rejected_with_reason(tiny, tiny_dirs, request_, reason):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    outcome = editor.apply([request_, REQUESTS[0]], editor.new_state())
    assert [r.key for r in outcome.applied] == ["1"]
    assert reason in outcome.rejected[0][1]
    assert outcome.state.steps == 1 and outcome.state.edits == 1


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(2, 7), st.floats(0.05, 1.5), st.integers(0, 10_000))
def test_capping_singular_values_lowers_only_those_above_the_cap(rows, cols, share, seed):
    """``cap_singular_values``: the same singular vectors, each singular value ``min(s, cap)``,
    nothing left to cap on a second pass, and the share of the Frobenius norm it removed."""
    change = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    u, s, vh = torch.linalg.svd(change, full_matrices=False)
    cap = share * float(s[0])
    capped, removed = cap_singular_values(change, cap)
    torch.testing.assert_close(capped, (u * s.clamp(max=cap)) @ vh)
    assert float(torch.linalg.matrix_norm(capped, ord=2)) <= cap + 1e-9
    assert removed == pytest.approx(float((change - capped).norm() / change.norm()), abs=1e-12)
    again, removed_again = cap_singular_values(capped, cap)
    assert removed_again == pytest.approx(0.0, abs=1e-7) and torch.allclose(again, capped, atol=1e-9)
    if share >= 1.0:
        assert removed == 0.0 and torch.equal(capped, change)  # nothing above the cap: untouched
