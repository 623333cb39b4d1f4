"""Acceptance of the engine on the real default model (SmolLM2-135M-Instruct) and real CounterFact data."""

from __future__ import annotations

import pytest
import torch
from tiny_models import DEVICE

from engine.editor import Editor
from engine.hparams import EditHyperParams
from engine.models import load_model
from evaluation.counterfact import load_counterfact
from evaluation.metrics import score_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm(model_cache):
    return load_model("default", cache_dir=model_cache / "models", device=DEVICE)


def _next_tokens(loaded, prompts):
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to(loaded.device)
            out.append(int(loaded.model(ids).logits[0, -1].argmax()))
    return out


def test_default_model_is_the_embedded_smollm2_and_knows_facts(smollm):
    assert smollm.model_type == "llama" and smollm.n_layers == 30
    ids = smollm.tokenizer("The capital of France is", return_tensors="pt").input_ids.to(smollm.device)
    out = smollm.model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in smollm.tokenizer.decode(out[0, ids.shape[1] :])


def test_metake_corrects_five_counterfact_facts_in_sequence(smollm, model_cache, test_data):
    """Five CounterFact records the unedited model gets wrong are all right after five sequential
    MetaKE edits, and the five neighbourhood prompts still get the same next token as before."""
    chosen = load_counterfact(test_data / "counterfact-excerpt.json", 5)
    before = score_records(smollm.model, smollm.tokenizer, chosen)
    assert all(s.rewrite[0] < s.rewrite[1] for s in before), [s.rewrite for s in before]  # as the excerpt was chosen
    neighbours = [r.neighborhood for r in chosen]
    neighbour_tokens = _next_tokens(smollm, neighbours)

    hparams = EditHyperParams.defaults_for(smollm.model_type).with_changes(
        stats={"source": str(test_data / "wikitext-2-raw-test-head.raw"), "n_tokens": 20000}
    )
    editor = Editor(smollm, hparams, model_cache / "stats")
    base = editor.edited_weights()
    state = editor.new_state()
    try:
        for record in chosen:
            outcome = editor.apply([record.request()], state)
            assert [d.key for d in outcome.applied] == [str(record.case_id)]
            diag = outcome.applied[0]
            assert diag.post.target_prob > diag.pre.target_prob
            assert 0 < diag.realised_gain < 1
            state = outcome.state
        assert state.steps == 5 and state.edits == 5
        after = score_records(smollm.model, smollm.tokenizer, chosen)
        assert all(s.rewrite[0] > s.rewrite[1] for s in after), [s.rewrite for s in after]
        assert _next_tokens(smollm, neighbours) == neighbour_tokens
    finally:
        editor.load_weights(base)
