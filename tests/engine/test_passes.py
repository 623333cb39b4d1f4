"""``max_passes``: a request the model does not say after a pass is planned and solved again.

The tiny models know no facts and say none of the targets, so the tests script what the says
check answers (``engine.editor.targets_said``) and pin the mechanics: how many passes run, that
they are one step and the batch's edits in the state, that every pass's keys enter ``C_prev``,
and that a request said after the first pass costs nothing more. The check itself is pinned
against greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tiny_models import DEVICE, REQUESTS, biting_hparams

import engine.editor
from engine.editor import Editor
from engine.models import load_model
from engine.requests import EditRequest, encode_target
from engine.scoring import targets_said


def scripted(monkeypatch: pytest.MonkeyPatch, answers: list[list[bool]]) -> list[int]:
    """Make the says check answer ``answers`` in turn; returns how many requests each call saw."""
    seen: list[int] = []
    replies: Iterator[list[bool]] = iter(answers)

    def said(model: object, tokenizer: object, requests: list[EditRequest]) -> list[bool]:
        seen.append(len(requests))
        return next(replies)

    monkeypatch.setattr(engine.editor, "targets_said", said)
    return seen


def first_layer_gram(editor: Editor, request: EditRequest, state: engine.editor.EditorState) -> torch.Tensor:
    """``k k^T`` of ``request`` at the first edited layer (no edit moves those keys)."""
    encoded = [editor._encode(request, state, 0)]
    first = editor.hparams.layers[0]
    keys, _ = editor._keys_and_outputs(encoded, first, editor.hparams.last_layer)
    return (keys.double() @ keys.double().T).cpu()


def test_a_request_not_said_is_planned_again_until_max_passes_in_one_step(tiny, tiny_dirs, monkeypatch):
    """Catches: the retry never running, running past ``max_passes``, counting the request's edit
    again, or leaving a pass's keys out of ``C_prev``."""
    editor = Editor(tiny, biting_hparams(tiny_dirs["corpus"], tiny.model_type, "alphaedit", max_passes=3))
    state = editor.new_state()
    gram = first_layer_gram(editor, REQUESTS[0], state)
    passes = engine.editor.Editor._pass
    calls = []

    def counted(self: Editor, encoded: list, *args: object) -> object:
        calls.append([item.request.key for item in encoded])
        return passes(self, encoded, *args)

    monkeypatch.setattr(engine.editor.Editor, "_pass", counted)
    seen = scripted(monkeypatch, [[False, True], [False, True], [False, True]])
    outcome = editor.apply(REQUESTS[:2], state)
    assert calls == [["1", "2"], ["1"], ["1"]]
    assert seen == [2, 2, 2]
    assert [d.passes for d in outcome.applied] == [3, 1]
    assert [d.says for d in outcome.applied] == [False, True]
    assert outcome.state.steps == 1 and outcome.state.edits == 2
    first = editor.hparams.layers[0]
    expected = 3 * gram + first_layer_gram(editor, REQUESTS[1], state)
    torch.testing.assert_close(outcome.state.constraints[first].double().cpu(), expected, atol=1e-4, rtol=1e-4)


def test_a_request_said_after_the_first_pass_costs_no_second(tiny_dirs, monkeypatch):
    """Catches: a second pass for a request the model already says (weights would differ)."""
    weights = []
    for max_passes in (1, 3):
        editor = Editor(
            load_model(tiny_dirs["llama"], device=DEVICE),
            biting_hparams(tiny_dirs["corpus"], "llama", "metake", max_passes=max_passes),
        )
        scripted(monkeypatch, [[True]])
        outcome = editor.apply(REQUESTS[:1], editor.new_state())
        assert outcome.applied[0].passes == 1 and outcome.applied[0].says
        weights.append(editor.edited_weights())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


SUBJECTS = ("France", "Danielle Darrieux", "Toko Yasuda", "Rome", "piano", "guitar", "the city", "a song")


def test_targets_said_is_whether_greedy_decoding_begins_with_the_target(tiny):
    """Catches: a says check that scores the wrong position, or only the target's first token."""
    tok = tiny.tokenizer
    for subject in SUBJECTS:  # a prompt whose two greedy tokens read back as a target
        prompt = f"The capital of {subject} is"
        ids = tok(prompt, return_tensors="pt").input_ids.to(tiny.device)
        greedy = tiny.model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        first, second = greedy[0, ids.shape[1] :].tolist()
        said = tok.decode([first, second])
        if said.startswith(" ") and said.strip() and encode_target(tok, prompt, said) == [first, second]:
            break
    else:
        pytest.fail("no prompt's greedy continuation reads back as a target")
    unsaid = next(  # the same first token, another second one
        text
        for other in range(len(tok))
        if other != second
        and encode_target(tok, prompt, text := tok.decode([first, other])) == [first, other]
        and text.strip()
    )
    requests = [EditRequest("The capital of {} is", subject, t.strip()) for t in (said, unsaid)]
    assert targets_said(tiny.model, tok, requests) == [True, False]
