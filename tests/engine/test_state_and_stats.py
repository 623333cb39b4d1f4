"""Editor state round trips, statistics caching with provenance, hyperparameter files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import DEVICE, REQUESTS, tiny_hparams

from engine.architecture import UnknownArchitectureError, architecture_for, edited_weight
from engine.editor import Editor
from engine.hooks import capture_outputs, run_until_stopped
from engine.hparams import EditHyperParams, StatsParams
from engine.models import load_model
from engine.projector import projector_for
from engine.requests import encode_with_subject
from engine.state import EditorState, StateMismatch
from engine.stats import StatisticsDamaged, _start_words, cache_path, key_statistics


def test_state_saves_and_loads_bitwise(tiny, tiny_dirs, tmp_path):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "metake"))
    state = editor.apply(REQUESTS[:2], editor.new_state()).state
    path = tmp_path / "state.safetensors"
    state.save(path)
    loaded = EditorState.load(path)
    assert loaded.equals(state)
    assert (loaded.steps, loaded.edits, loaded.layers) == (1, 2, (1, 2))
    assert loaded.prefixes == state.prefixes and len(state.prefixes) == 2
    for layer in state.layers:
        assert loaded.constraints[layer].dtype == torch.float32
        assert torch.equal(loaded.constraints[layer], state.constraints[layer].cpu())
        assert loaded.constraints[layer].abs().sum() > 0
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]  # no temporary left behind


def test_state_of_another_model_is_refused(tiny, tiny_dirs):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    foreign = EditorState.fresh("sha256:other", (1, 2), editor.key_width)
    with pytest.raises(StateMismatch, match="belongs to model sha256:other"):
        editor.apply(REQUESTS[:1], foreign)


def test_apply_returns_a_new_state_and_leaves_the_old_one(tiny, tiny_dirs):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    first = editor.new_state()
    second = editor.apply(REQUESTS[:1], first).state
    assert first.steps == 0 and all(c.abs().sum() == 0 for c in first.constraints.values())
    assert second.steps == 1 and second.edits == 1


def _subject_output(loaded, request, layer):
    ids, pos = encode_with_subject(loaded.tokenizer, request.prompt, request.subject)
    name = loaded.spec.layer(layer)
    with torch.no_grad(), capture_outputs(loaded.model, [name], stop_after=name) as seen:
        run_until_stopped(loaded.model, input_ids=torch.tensor([ids], device=loaded.device))
    return seen[name][0, pos]


def test_edit_moves_the_subject_representation_by_the_realised_plan(tiny, tiny_dirs):
    """In both weight orientations (Llama's Linear, GPT-2's transposed Conv1D) the multi-layer solve
    moves the last critical layer's output at the subject by about the planned residual (the earlier
    layers' changes add to what the last layer's operator alone realises, so not exactly)."""
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    before = _subject_output(tiny, REQUESTS[0], 2)
    diag = editor.apply(REQUESTS[:1], editor.new_state()).applied[0]
    moved = float((_subject_output(tiny, REQUESTS[0], 2) - before).norm())
    assert diag.upstream_steps > 0 and 0.5 < diag.realised_gain <= 1
    assert 0.5 * diag.planned_norm < moved < 1.5 * diag.planned_norm, (moved, diag)


def test_statistics_are_cached_with_provenance(tiny_dirs, tmp_path):
    loaded = load_model(tiny_dirs["llama"], device=DEVICE)
    params = tiny_hparams(tiny_dirs["corpus"]).stats
    first = key_statistics(loaded, (1, 2), params, tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert len(files) == 2 and all(name.startswith("c0-model.layers.") for name in files)
    second = key_statistics(loaded, (1, 2), params, tmp_path)
    for layer in (1, 2):
        assert torch.equal(first[layer].total, second[layer].total)
        assert first[layer].count == second[layer].count == 1500
        provenance = second[layer].provenance
        assert provenance["model"] == loaded.identity
        assert provenance["module"] == f"model.layers.{layer}.mlp.down_proj"
        assert provenance["tokens"] == 1500 and provenance["source"] == params.source
    sidecar = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert sidecar["sha256"] in {first[1].sha256, first[2].sha256}
    raw = load_file(next(tmp_path.rglob("*.safetensors")))
    assert raw["total"].dtype == torch.float64


def test_model_sampled_statistics_are_seeded(tiny_dirs):
    loaded = load_model(tiny_dirs["gpt2"], device=DEVICE)
    params = tiny_hparams(tiny_dirs["corpus"]).stats.__class__(
        source="model", n_tokens=200, seq_len=20, batch_size=5, seed=3
    )
    a = key_statistics(loaded, (1,), params, None)[1]
    b = key_statistics(loaded, (1,), params, None)[1]
    assert a.count == b.count >= 200
    assert torch.equal(a.total, b.total)


def test_sampled_statistics_are_cached_by_batch_size_and_read_text_is_not(tiny_dirs, tmp_path):
    """Another sampling batch draws other text: a cache of batch 16 must not answer for batch 64."""
    loaded = load_model(tiny_dirs["gpt2"], device=DEVICE)
    sampled = StatsParams(source="model", batch_size=16)
    read = StatsParams(source=str(tiny_dirs["corpus"]), batch_size=16)
    path = lambda label, params: cache_path(tmp_path, loaded, 1, label, params)  # noqa: E731
    assert path("model", sampled) != path("model", dataclasses.replace(sampled, batch_size=64))
    assert path("text-sha256:x", read) == path("text-sha256:x", dataclasses.replace(read, batch_size=64))
    per_sequence = dataclasses.replace(sampled, starts_per_sequence=True)
    assert path("model", sampled) != path("model", per_sequence)
    assert path("text-sha256:x", read) == path("text-sha256:x", dataclasses.replace(read, starts_per_sequence=True))


@pytest.mark.parametrize("per_sequence", [False, True])
def test_sampling_rounds_start_from_one_word_or_one_per_sequence(tiny_dirs, monkeypatch, per_sequence):
    """Per round, every sequence starts from the round's word; with ``starts_per_sequence`` the
    sequences take the words in turn, across rounds, without padding."""
    loaded = load_model(tiny_dirs["gpt2"], device=DEVICE)
    prompts: list[list[str]] = []
    generate = loaded.model.generate

    def spy(**inputs):
        assert bool(inputs["attention_mask"].all())
        prompts.append(loaded.tokenizer.batch_decode(inputs["input_ids"]))
        return generate(**inputs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    params = StatsParams(source="model", n_tokens=43, seq_len=10, batch_size=2, starts_per_sequence=per_sequence)
    stats = key_statistics(loaded, (1,), params, None)[1]
    assert len(prompts) == 3 and stats.count >= 43
    if per_sequence:
        words = _start_words(loaded.tokenizer)  # those of the tiny vocabulary's common length
        assert len(words) == 3 and "The" in words
        # 20 tokens a round (the prompt token and 9 fed-back ones per sequence); 3 are missing
        # after two rounds, so the last round samples one sequence
        assert prompts == [[words[0], words[1]], [words[2], words[0]], [words[1]]]
        assert stats.count == 2 * 2 * 10 + 10
    else:
        assert prompts == [["The"] * 2, ["In"] * 2, ["A"] * 2]


def test_sampling_progress_moves_every_decode_step(tiny_dirs, monkeypatch):
    """The first run waits minutes on sampling: the bar (and its time estimate) must move with each
    forward pass, not once a round."""
    updates: list[int] = []

    class Bar:
        def __init__(self, **kwargs):
            pass

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr("engine.stats.tqdm", Bar)
    loaded = load_model(tiny_dirs["gpt2"], device=DEVICE)
    params = StatsParams(source="model", n_tokens=40, seq_len=10, batch_size=2, starts_per_sequence=True)
    stats = key_statistics(loaded, (1,), params, None)[1]
    assert sum(updates) == stats.count == 40
    assert len(updates) == 2 * 10  # two rounds of one prompt pass and 9 decode steps


def test_damaged_caches_are_refused_or_recomputed(tiny_dirs, tmp_path):
    """Statistics take minutes to recompute: a damaged file is an error naming it. A projector
    takes a second: a damaged one is computed again and rewritten."""
    loaded = load_model(tiny_dirs["llama"], device=DEVICE)
    params = tiny_hparams(tiny_dirs["corpus"]).stats
    stats = key_statistics(loaded, (1,), params, tmp_path)[1]
    projector_dir = tmp_path / "projectors"
    first = projector_for(stats, 0.1, projector_dir, relative=True)
    (cached,) = projector_dir.glob("projector-*.safetensors")
    with safe_open(cached, framework="pt") as handle:
        meta = handle.metadata()
    save_file({"matrix": torch.eye(first.matrix.shape[0], dtype=torch.float64)}, cached, metadata=meta)
    again = projector_for(stats, 0.1, projector_dir, relative=True)
    assert torch.equal(again.matrix, first.matrix)  # not the identity that was written over it
    (path,) = tmp_path.rglob("c0-*.safetensors")
    tampered = load_file(path)
    tampered["total"][0, 0] += 1.0
    with safe_open(path, framework="pt") as handle:
        stats_meta = handle.metadata()
    save_file(tampered, path, metadata=stats_meta)
    with pytest.raises(StatisticsDamaged, match=f"statistics cache {path} does not match the sha256"):
        key_statistics(loaded, (1,), params, tmp_path)


def test_hyperparameters_load_from_file_and_reject_unknown_keys(tmp_path):
    path = tmp_path / "h.toml"
    path.write_text('layers = [2, 3]\nmethod = "memit"\n[solver]\nmom2_weight = 1600.0\n')
    hp = EditHyperParams.from_file(path)
    assert hp.layers == (2, 3) and hp.method == "memit" and hp.solver.mom2_weight == 1600.0
    assert hp.upstream.clamp_norm_factor == 0.75
    assert EditHyperParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp
    path.write_text("layers = [2]\n[solver]\nlambda = 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) in \[solver\]: lambda"):
        EditHyperParams.from_file(path)
    with pytest.raises(ValueError, match="unknown method 'rome'"):
        EditHyperParams(layers=(1,), method="rome")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown plan_dtype 'float8'; choose one of float32, bfloat16"):
        EditHyperParams(layers=(1,), plan_dtype="float8")
    path.write_text('layers = [2]\n[solver]\nspread = "last"\n')
    with pytest.raises(ValueError, match=r"unknown \[solver\] spread 'last'; choose one of remainder, even"):
        EditHyperParams.from_file(path)
    with pytest.raises(ValueError, match="plan_chunk_requests must be at least 1, got 0"):
        EditHyperParams(layers=(1,), plan_chunk_requests=0)
    with pytest.raises(ValueError, match="max_passes must be at least 1, got 0"):
        EditHyperParams(layers=(1,), max_passes=0)
    path.write_text("layers = [2]\n[solver]\naccumulated_weight = 0.0\n")
    with pytest.raises(ValueError, match=r"\[solver\] accumulated_weight must be positive, got 0.0"):
        EditHyperParams.from_file(path)


def test_layer_groups_load_from_file_and_must_make_up_the_layers(tmp_path):
    path = tmp_path / "h.toml"
    path.write_text("layers = [2, 3, 4, 5]\nlayer_groups = [[2, 4], [3, 5]]\n")
    hp = EditHyperParams.from_file(path)
    assert hp.layer_groups == ((2, 4), (3, 5))
    assert [hp.layers_of_batch(step) for step in range(3)] == [(2, 4), (3, 5), (2, 4)]
    assert EditHyperParams.from_dict(json.loads(json.dumps(hp.to_dict()))) == hp
    assert EditHyperParams(layers=(2, 3)).layers_of_batch(7) == (2, 3)
    with pytest.raises(ValueError, match=r"layer_groups \[\[2, 4\]\] must together be the layers \[2, 3, 4, 5\]"):
        hp.with_changes(layer_groups=[[2, 4]])
    with pytest.raises(ValueError, match=r"each of layer_groups must be a non-empty increasing list, got \[4, 2\]"):
        hp.with_changes(layer_groups=[[4, 2], [3, 5]])


def test_a_variant_file_extends_its_base_key_by_key(tmp_path):
    (tmp_path / "base.toml").write_text(
        'layers = [2, 3]\nmethod = "metake"\n[outer]\ngamma = 200.0\nsteps = 7\n[solver]\nalpha = 5.0\n'
    )
    variants = tmp_path / "variants"
    variants.mkdir()
    (variants / "v.toml").write_text('extends = "../base.toml"\nseed = 3\n[outer]\ngamma = 800.0\n')
    (variants / "w.toml").write_text('extends = "v.toml"\nlayers = [4]\n')
    base = EditHyperParams.from_file(tmp_path / "base.toml")
    v = EditHyperParams.from_file(variants / "v.toml")
    assert v == base.with_changes(seed=3, outer={"gamma": 800.0})
    assert v.outer.steps == 7 and v.solver.alpha == 5.0
    assert EditHyperParams.from_file(variants / "w.toml") == v.with_changes(layers=[4])
    (variants / "v.toml").write_text('extends = "w.toml"\n')
    with pytest.raises(ValueError, match="extends forms a cycle"):
        EditHyperParams.from_file(variants / "w.toml")
    (variants / "v.toml").write_text('extends = "missing.toml"\n')
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        EditHyperParams.from_file(variants / "v.toml")


def test_family_defaults():
    assert EditHyperParams.defaults_for("llama").layers == (4, 5, 6, 7, 8)
    assert EditHyperParams.defaults_for("qwen2").layers == (4, 5, 6, 7, 8)
    assert EditHyperParams.defaults_for("gpt2").layers == (3, 4, 5, 6)


def test_unknown_architecture_names_the_setting():
    with pytest.raises(UnknownArchitectureError, match=r"set \[architecture\] layers, mlp_out"):
        architecture_for("mamba")
    assert architecture_for("gpt2").weight_transposed


def test_edited_weight_name_is_the_state_dict_key_of_the_edited_weight(tiny):
    """Checkpoints and the bench's norm growth find the edited weight by this name."""
    layer = 2
    state = tiny.model.state_dict(keep_vars=True)
    assert state[tiny.spec.edited_weight_name(layer)] is edited_weight(tiny.model, tiny.spec, layer)


def test_diagnostics_score_prompt_paraphrases_and_neighbours(tiny, tiny_dirs):
    from engine.requests import EditRequest

    request = EditRequest(
        "The capital of {} is",
        "France",
        "Rome",
        original="Paris",
        paraphrases=("France's capital is", "The capital city of France is"),
        neighbors=(("The capital of Italy is", "Rome"), ("The capital of Japan is", "Tokyo")),
        key="7",
    )
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    diag = editor.apply([request], editor.new_state()).applied[0]
    for scores in (diag.pre, diag.post):
        metrics = scores.metrics()
        assert set(metrics) == {
            "target_prob",
            "original_prob",
            "paraphrase_target_prob",
            "paraphrase_efficacy",
            "neighbor_answer_prob",
            "neighbor_kept",
            "efficacy",
        }
        assert all(0.0 <= value <= 1.0 for value in metrics.values())
        assert metrics["paraphrase_efficacy"] in (0.0, 0.5, 1.0) and metrics["neighbor_kept"] in (0.0, 0.5, 1.0)
    bare = editor.apply([EditRequest("{} is in", "Paris", "France")], editor.new_state()).applied[0]
    assert set(bare.pre.metrics()) == {"target_prob", "efficacy"}
    assert bare.pre.holds == (bare.pre.target_prob > 0.5)


def test_an_architecture_outside_the_table_loads_through_the_hparams_file(tmp_path, tiny_dirs):
    """``[architecture]`` reaches the loader end to end: the daemon's model loading, the editor, an edit."""
    from tiny_models import save_tiny_model, write_hparams

    from daemon.settings import DaemonSettings
    from daemon.workspace import load_base_model, resolve_hparams
    from storage.errors import InvalidInput
    from storage.home import DataHome

    model_dir = save_tiny_model("phi", tmp_path / "phi")
    with pytest.raises(UnknownArchitectureError, match="unknown model type 'phi': set \\[architecture\\]"):
        load_model(model_dir, device=DEVICE)
    hparams = write_hparams(tmp_path / "phi.toml", tiny_dirs["corpus"])
    hparams.write_text(
        hparams.read_text()
        + '\n[architecture]\nlayers = "model.layers"\nmlp_out = "model.layers.{}.mlp.fc2"\n'
        + 'final_norm = "model.final_layernorm"\nlm_head = "lm_head"\n'
    )
    home = DataHome(tmp_path / "home")
    settings = DaemonSettings(model=str(model_dir), hparams_file=hparams, device=DEVICE)
    loaded = load_base_model(settings, home)
    assert loaded.model_type == "phi" and loaded.spec.mlp_out == "model.layers.{}.mlp.fc2"
    editor = Editor(loaded, resolve_hparams(settings, loaded))
    before = editor.edited_weights()
    outcome = editor.apply(REQUESTS[:1], editor.new_state())
    assert [d.key for d in outcome.applied] == ["1"]
    after = editor.edited_weights()
    assert set(after) == {"model.layers.1.mlp.fc2.weight", "model.layers.2.mlp.fc2.weight"}
    assert all(not torch.equal(before[k], after[k]) for k in after)
    hparams.write_text(hparams.read_text().replace("mlp.fc2", "mlp.nothing"))
    with pytest.raises(InvalidInput, match="module 'model.layers.0.mlp.nothing' not found in PhiForCausalLM"):
        load_base_model(settings, home)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"solver": {"nullspace_threshold": 0.2}}, "nullspace_threshold 0.1 -> 0.2"),
        ({"solver": {"alpha": 0.5}}, "alpha 0.01 -> 0.5"),
        ({"method": "alphaedit"}, "method metake -> alphaedit"),
        ({"solver": {"mom2_weight": 10.0}}, "mom2_weight 15000.0 -> 10.0"),
        ({"solver": {"null_space_c0_weight": 5.0}}, "null_space_c0_weight \\(unset\\) -> 5.0"),
        ({"layers": [1, 3]}, "state edits layers \\[1, 2\\], the settings say \\[1, 3\\]"),
        ({"layer_groups": [[1], [2]]}, "layer_groups \\(unset\\) -> \\[\\[1\\], \\[2\\]\\]"),
    ],
)
def test_a_state_refuses_to_continue_under_other_settings(tiny_dirs, changes, message):
    loaded = load_model(tiny_dirs["llama"], device=DEVICE)
    state = Editor(loaded, tiny_hparams(tiny_dirs["corpus"], "metake")).new_state()
    other = Editor(loaded, tiny_hparams(tiny_dirs["corpus"], "metake").with_changes(**changes))
    with pytest.raises(StateMismatch, match=message):
        other.apply(REQUESTS[:1], state)
    with pytest.raises(StateMismatch, match=message):
        other.check_state(EditorState.from_parts(state.metadata(), state.tensors()))


def test_a_state_refuses_other_projectors_and_old_states_still_load(tiny, tiny_dirs):
    import dataclasses

    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "metake"))
    state = editor.new_state()
    foreign = dataclasses.replace(state, projector_sha256={k: "0" * 64 for k in state.projector_sha256})
    with pytest.raises(StateMismatch, match="other null-space projectors"):
        editor.check_state(foreign)
    old = {k: v for k, v in state.metadata().items() if k != "settings"} | {"format": "1"}
    restored = EditorState.from_parts(old, state.tensors())
    assert restored.settings == {}
    editor.check_state(restored)  # a format-1 state has no settings to compare; the rest is checked


def test_float32_accumulated_constraint_drifts_little_over_ten_thousand_edits():
    """``C_prev`` is kept in float32 (half the checkpoint); its rounding after 10,000 single-edit
    updates, against a float64 sum of the same keys, stays below 1e-5 of its norm (measured:
    about 2e-6 for SmolLM2-like keys of norm ~20 in 256 dimensions)."""
    torch.manual_seed(0)
    d = 256
    mixing = torch.randn(d, d, dtype=torch.float64) / d**0.5
    state = EditorState.fresh("sha256:synthetic", (0,), d)
    exact = torch.zeros(d, d, dtype=torch.float64)
    for _ in range(100):
        keys = mixing @ torch.randn(d, 100, dtype=torch.float64) * 2.0
        for k in keys.T:
            outer = torch.outer(k, k)
            exact += outer
            state = state.after_batch({0: outer}, 1)
    drift = float((state.constraints[0].double() - exact).norm() / exact.norm())
    print(f"relative drift of float32 C_prev after {state.edits} edits: {drift:.2e}")
    assert state.edits == 10_000
    assert drift < 1e-5


def test_the_state_carries_p_c_prev_p_and_an_older_state_without_it_continues_alike(tiny, tiny_dirs, tmp_path):
    """Catches: ``P C_prev P`` not accumulated, or out of step with ``C_prev``; a format-2 state
    (no ``projected``) must edit on exactly as the state it was saved from, up to rounding."""
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "alphaedit"))
    state = editor.new_state()
    for request in REQUESTS[:2]:
        state = editor.apply([request], state).state
    path = tmp_path / "state.safetensors"
    state.save(path)
    loaded = EditorState.load(path)
    assert loaded.equals(state) and set(loaded.projected) == set(state.layers)
    for layer in state.layers:
        projector = editor.projectors[layer].matrix.to(state.constraints[layer].device)
        want = projector @ state.constraints[layer].double() @ projector
        assert want.norm() > 0
        torch.testing.assert_close(state.projected[layer].double(), want, rtol=1e-5, atol=1e-5 * float(want.norm()))
    older = EditorState.from_parts(
        state.metadata() | {"format": "2"}, {f"constraint.{layer}": state.constraints[layer] for layer in state.layers}
    )
    assert older.projected == {}
    after = {}
    for name, start in (("current", state), ("older", older)):
        edited = editor.edited_weights()
        outcome = editor.apply(REQUESTS[2:], start)
        after[name] = (editor.edited_weights(), outcome.state)
        editor.load_weights(edited)
    (w_new, s_new), (w_old, s_old) = after["current"], after["older"]
    for name in w_new:
        change = (w_new[name] - edited[name]).double().norm()
        gap = float((w_old[name] - w_new[name]).double().norm() / change)
        print(f"{name}: ||dW_older - dW|| / ||dW|| = {gap:.1e}")
        assert change > 0 and gap < 1e-3
    assert set(s_old.projected) == set(state.layers)  # the older state's next state carries it
    for layer in state.layers:
        torch.testing.assert_close(s_old.projected[layer], s_new.projected[layer], rtol=1e-4, atol=1e-3)


def test_memit_states_carry_no_projected_constraint(tiny, tiny_dirs):
    editor = Editor(tiny, tiny_hparams(tiny_dirs["corpus"], "memit"))
    state = editor.apply(REQUESTS[:1], editor.new_state()).state
    assert state.projected == {} and not any(name.startswith("projected.") for name in state.tensors())
