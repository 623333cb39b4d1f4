"""Editor state round trips, statistics caching with provenance, hyperparameter files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import DEVICE, REQUESTS, tiny_hparams

from engine.architecture import UnknownArchitectureError, architecture_for
from engine.editor import Editor
from engine.hooks import capture_outputs, run_until_stopped
from engine.hparams import EditHyperParams
from engine.models import load_model
from engine.requests import encode_with_subject
from engine.state import EditorState, StateMismatch
from engine.stats import key_statistics


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


def test_family_defaults():
    assert EditHyperParams.defaults_for("llama").layers == (4, 5, 6, 7, 8)
    assert EditHyperParams.defaults_for("qwen2").layers == (4, 5, 6, 7, 8)
    assert EditHyperParams.defaults_for("gpt2").layers == (3, 4, 5, 6)


def test_unknown_architecture_names_the_setting():
    with pytest.raises(UnknownArchitectureError, match=r"set \[architecture\] layers, mlp_out"):
        architecture_for("mamba")
    assert architecture_for("gpt2").weight_transposed


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
