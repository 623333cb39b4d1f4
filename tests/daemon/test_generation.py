"""Per-correction generation metrics: does the model say the fact, before and after its edit."""

from __future__ import annotations

from daemon import generation
from daemon.generation import generation_metrics, said
from storage.edits import MetricValue
from storage.models import Correction, Phase


def _correction(correction_id: int) -> Correction:
    return Correction(
        id=correction_id,
        prompt="The capital of {} is",
        subject="France",
        target="Rome",
        paraphrases=["France's capital is", "The French capital is"],
        neighbors=[
            {"prompt": "The capital of Spain is", "answer": "Madrid"},
            {"prompt": "Peru's capital is", "answer": "Lima"},
        ],
    )


def test_said_scores_each_prompt_kind_against_its_own_answer(monkeypatch):
    continuations = {
        "The capital of France is": " Rome, the eternal city",
        "France's capital is": " rome.",
        "The French capital is": " Paris",
        "The capital of Spain is": " Madrid",
        "Peru's capital is": " Limassol",  # a longer word is not the answer
    }
    seen = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens):
        seen.append(list(prompts))
        return [continuations[p] for p in prompts]

    monkeypatch.setattr(generation, "generate_greedy", fake_generate)
    found = said(None, None, [_correction(7)])
    assert found == {7: {"gen_efficacy": 1.0, "gen_paraphrase": 0.5, "gen_neighbourhood": 0.5}}
    assert len(seen) == 1 and len(seen[0]) == 5  # one batched decode for everything
    assert said(None, None, []) == {}


def test_only_applied_corrections_get_generation_metrics():
    before = {1: {"gen_efficacy": 0.0}, 2: {"gen_efficacy": 0.0}}
    after = {1: {"gen_efficacy": 1.0}}  # 2 was rejected: measured before, never after
    assert generation_metrics(before, after) == [
        MetricValue(1, "gen_efficacy", Phase.PRE, 0.0),
        MetricValue(1, "gen_efficacy", Phase.POST, 1.0),
    ]
