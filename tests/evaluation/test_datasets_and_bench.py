"""Dataset slices, the zsRE protocol's metrics, the edit score, and ``metake bench`` wiring."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from cli import main
from engine.editor import Editor, snapshot_weights
from engine.hparams import EditHyperParams
from engine.models import load_model
from engine.state import EditorState
from evaluation import metrics as metrics_module
from evaluation.bench import edit_score, evaluate_model, run_benchmark
from evaluation.counterfact import load_counterfact
from evaluation.metrics import says_answer
from evaluation.zsre import ZsreRecord, ZsreScores, is_zsre, load_zsre, score_zsre, zsre_metrics


def counterfact_file(path, n=6):
    records = [
        {
            "case_id": 100 + i,
            "prompt": f"The capital of Land{i} is",
            "subject": f"Land{i}" if i != 2 else "Elsewhere",  # record 2: subject not in its prompt
            "target_new": "Rome",
            "ground_truth": "Paris",
            "rephrase_prompt": f"Land{i}'s capital is",
            "locality_prompt": "The capital of France is",
            "locality_ground_truth": "Paris",
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(records))
    return path


def zsre_file(path):
    records = [
        {
            "subject": subject,
            "src": f"What is the capital of {subject}?",
            "pred": "Paris",
            "rephrase": f"Which city is the capital of {subject}?",
            "alt": "Rome",
            "answers": ["Paris"],
            "loc": "nq question: who founded apple",
            "loc_ans": "Steve Jobs",
            "cond": "",
        }
        for subject in ("France", "Italy", "Japan")
    ]
    path.write_text(json.dumps(records))
    return path


def test_slices_count_records_in_the_file(tmp_path):
    path = counterfact_file(tmp_path / "cf.json")
    assert [r.case_id for r in load_counterfact(path)] == [100, 101, 103, 104, 105]
    assert [r.case_id for r in load_counterfact(path, 2, offset=3)] == [103, 104]
    assert [r.case_id for r in load_counterfact(path, None, offset=2)] == [103, 104, 105]
    assert load_counterfact(path, 5, offset=6) == []


def test_zsre_records_load_as_requests(tmp_path):
    path = zsre_file(tmp_path / "zsre.json")
    assert is_zsre(json.loads(path.read_text()))
    assert not is_zsre(json.loads(counterfact_file(tmp_path / "cf.json").read_text()))
    records = load_zsre(path, 2, offset=1)
    assert [r.subject for r in records] == ["Italy", "Japan"] and records[0].case_id == 1
    request = records[0].request()
    assert request.prompt == "What is the capital of {}?" and request.subject == "Italy"
    assert request.target == "Rome" and request.paraphrases == ("Which city is the capital of Italy?",)


def test_zsre_metrics_are_token_level_top1_shares():
    before = [ZsreScores((False, False), (False,), (5, 6)), ZsreScores((False,), (False,), (7,))]
    after = [ZsreScores((True, False), (True,), (5, 9)), ZsreScores((True,), (False,), (7,))]
    metrics = zsre_metrics(after, before)
    assert metrics == {"efficacy": 75.0, "generalisation": 50.0, "locality": 75.0}
    assert zsre_metrics(before) == {"efficacy": 0.0, "generalisation": 0.0}


def test_zsre_scoring_matches_the_full_logits(tiny_llama):
    """Top-1 hits under teacher forcing, checked against the argmax of the model's full logits."""
    from engine.requests import encode_target

    loaded = load_model(tiny_llama[0], device="cpu")
    tok = loaded.tokenizer
    question, answer = "The capital of France is", "Paris is in France"
    record = ZsreRecord(0, question, "France", answer, question, "Rome is the capital of", "Italy")
    prompt_ids, target_ids = tok(question).input_ids, encode_target(tok, question, answer)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt_ids + target_ids[:-1]])).logits[0]
    top1 = logits[len(prompt_ids) - 1 :].argmax(dim=-1).tolist()
    expected = tuple(a == b for a, b in zip(top1, target_ids, strict=True))
    (scores,) = score_zsre(loaded.model, tok, [record])
    assert len(target_ids) >= 3 and scores.rewrite == expected == scores.rephrase
    assert len(scores.locality) == len(encode_target(tok, record.locality_prompt, "Italy"))
    assert zsre_metrics([scores], [scores])["locality"] == 100.0


def test_edit_score_is_the_harmonic_mean():
    assert edit_score({"efficacy": 100.0, "generalisation": 50.0, "specificity": 100.0}) == pytest.approx(75.0)
    assert edit_score({"efficacy": 90.0, "generalisation": 90.0, "locality": 90.0}) == pytest.approx(90.0)
    assert edit_score({"efficacy": 100.0, "generalisation": 0.0, "specificity": 100.0}) == 0.0


def test_each_method_runs_with_its_own_hparams(tiny_llama, tmp_path):
    loaded = load_model(tiny_llama[0], device="cpu")
    hp = EditHyperParams.from_file(tiny_llama[1])
    records = load_zsre(zsre_file(tmp_path / "zsre.json"), 2)
    plain = run_benchmark(loaded, hp, records, ["memit"], 1, None, [], fluency_n=0, progress=False)
    tuned = run_benchmark(
        loaded,
        hp,
        records,
        ["memit"],
        1,
        None,
        [],
        fluency_n=0,
        progress=False,
        method_hparams={"memit": hp.with_changes(solver={"mom2_weight": 1.0})},
    )
    assert plain[0].metrics == tuned[0].metrics  # same unedited model, same records
    # the shared hparams' statistics are never computed when every method brings its own
    unreadable = hp.with_changes(stats={"source": str(tmp_path / "no-such-text")})
    again = run_benchmark(
        loaded,
        unreadable,
        records,
        ["memit"],
        1,
        None,
        [],
        0,
        False,
        {"memit": hp.with_changes(solver={"mom2_weight": 1.0})},
    )
    assert again[1].relative_weight_change == tuned[1].relative_weight_change
    assert set(plain[1].metrics) >= {"efficacy", "generalisation", "locality", "score"}
    assert plain[1].relative_weight_change != tuned[1].relative_weight_change
    with pytest.raises(ValueError, match="memit edits layers \\[1, 3\\], the benchmark \\[1, 2\\]"):
        run_benchmark(loaded, hp, records, ["memit"], 1, None, [], 0, False, {"memit": hp.with_changes(layers=[1, 3])})


def test_bench_command_reads_a_slice_and_per_method_hparams(tiny_llama, tmp_path):
    model, hparams = tiny_llama
    data = counterfact_file(tmp_path / "cf.json")
    memit = tmp_path / "memit.toml"
    memit.write_text(hparams.read_text().replace("[solver]", "[solver]\nmom2_weight = 1.0"))
    args = ["--home", str(tmp_path / "home"), "bench", "--data", str(data), "--n", "2", "--offset", "3"]
    args += ["--methods", "alphaedit,memit", "--model", str(model), "--hparams", str(hparams), "--device", "cpu"]
    args += ["--method-hparams", f"memit={memit}", "--fluency-n", "0", "--threads", "1", "--json"]
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(main, args)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["method"] for r in rows] == ["unedited", "alphaedit", "memit"]
    assert all(r["applied"] == 2 and r["threads"] == 1 and r["batch_size"] == 1 for r in rows[1:])
    stages = {"median_s_scoring", "median_s_plan_setup", "median_s_upstream", "median_s_solve"}
    assert all(stages <= set(r) for r in rows[1:])
    bad = CliRunner().invoke(main, [*args[:-3], "--method-hparams", "rome=x.toml"])
    assert bad.exit_code == 2 and "expected METHOD=FILE" in bad.output


@pytest.mark.parametrize(
    ("generated", "answer", "said"),
    [
        (" Paris, the capital", "Paris", True),
        ("PARIS.", "paris", True),
        ('"Paris" is', "Paris", True),
        (" Parisian food", "Paris", False),  # the start of a longer word is not the answer
        (" the city of Paris", "Paris", False),  # it must come first
        (" New York City", "New York", True),
        ("", "Paris", False),
        (" Paris", "", False),
    ],
)
def test_a_continuation_says_the_answer_only_when_it_starts_with_it(generated, answer, said):
    assert says_answer(generated, answer) is said


def test_bench_reports_generation_metrics_for_counterfact(tiny_llama, tmp_path, monkeypatch):
    """The generated texts are matched to the right prompts and answers (rewrite and paraphrase to
    the new target, neighbourhood to the true answer)."""
    loaded = load_model(tiny_llama[0], device="cpu")
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 3)
    records[1] = dataclasses.replace(records[1], neighborhood="The capital of Spain is")
    records[2] = dataclasses.replace(records[2], neighborhood="The capital of Portugal is")
    said = {
        records[0].prompt: records[0].target_new,  # edited: says the new target
        records[0].paraphrase: "something else",
        records[0].neighborhood: records[0].target_true,  # the neighbour kept its answer
        records[1].prompt: records[1].target_true,  # not edited
        records[1].paraphrase: " " + records[1].target_new + ".",
        records[1].neighborhood: records[1].target_new,  # the neighbour was bled into
        records[2].prompt: records[2].target_true,
        records[2].paraphrase: records[2].target_true,
        records[2].neighborhood: records[2].target_true,  # kept: two of three neighbours say their answer
    }
    prompts_seen: list[str] = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch=16):
        prompts_seen.extend(prompts)
        return [said[p] for p in prompts]

    monkeypatch.setattr(metrics_module, "generate_greedy", fake_generate)
    metrics, _ = evaluate_model(loaded, records, [], 0, None)
    third, two_thirds = pytest.approx(100 / 3), pytest.approx(200 / 3)
    assert (metrics["gen_efficacy"], metrics["gen_paraphrase"], metrics["gen_neighbourhood"]) == (
        third,
        third,
        two_thirds,
    )
    assert sorted(prompts_seen) == sorted(said)


def test_scoring_some_kinds_of_prompt_gives_what_scoring_all_of_them_gives(tiny_llama, tmp_path):
    """The lifelong benchmark scores only the prompts a figure reads (retention: the rewrite
    prompt; specificity: the neighbourhood prompt): each part's scores are those of a full scoring,
    the parts not asked for are absent, and the metrics are those of the parts scored."""
    from evaluation.metrics import PARTS, counterfact_metrics, score_records

    loaded = load_model(tiny_llama[0], device="cpu")
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 4)
    records[1] = dataclasses.replace(records[1], neighborhood="The capital of Spain is")
    full = score_records(loaded.model, loaded.tokenizer, records)
    assert all(getattr(s, part) is not None for s in full for part in PARTS)
    names = {"rewrite": "efficacy", "paraphrase": "generalisation", "neighborhood": "specificity"}
    for parts in (("rewrite",), ("neighborhood",), ("rewrite", "paraphrase")):
        some = score_records(loaded.model, loaded.tokenizer, records, parts)
        for a, b in zip(full, some, strict=True):
            for part in PARTS:
                if part in parts:
                    assert getattr(b, part) == pytest.approx(getattr(a, part), abs=1e-4)
                else:
                    assert getattr(b, part) is None
        whole = counterfact_metrics(full)
        assert counterfact_metrics(some) == {names[p]: whole[names[p]] for p in parts}
    with pytest.raises(ValueError, match="unknown or no prompt kinds"):
        score_records(loaded.model, loaded.tokenizer, records, ("prompt",))


def test_generation_metrics_generate_only_the_kinds_of_prompt_asked_for(tiny_llama, tmp_path, monkeypatch):
    loaded = load_model(tiny_llama[0], device="cpu")
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 2)
    said = {records[0].prompt: records[0].target_new, records[1].prompt: "elsewhere"}
    prompts_seen: list[str] = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch=16):
        prompts_seen.extend(prompts)
        return [said[p] for p in prompts]

    monkeypatch.setattr(metrics_module, "generate_greedy", fake_generate)
    got = metrics_module.generation_metrics(loaded.model, loaded.tokenizer, records, ("rewrite",))
    assert got == {"gen_efficacy": 50.0} and prompts_seen == [records[0].prompt, records[1].prompt]


def saved_weights(out, method: str) -> dict:
    from safetensors.torch import load_file

    return load_file(out / json.loads((out / f"resume-{method}.json").read_text())["weights"])


def test_lifelong_run_writes_curves_and_plots_and_resumes_where_it_stopped(tiny_llama, tmp_path):

    from evaluation.lifelong import draw_curves, points_table, read_curves, run_lifelong

    loaded = load_model(tiny_llama[0], device="cpu")
    hp = EditHyperParams.from_file(tiny_llama[1])
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 5)
    methods = {"alphaedit": hp.with_changes(method="alphaedit")}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    points = run_lifelong(loaded, methods, records, 1, 2, whole, None, [], progress=False)
    assert [(p["method"], p["edits"]) for p in points] == [("unedited", 0)] + [("alphaedit", e) for e in (2, 4, 5)]
    assert set(points[1]) >= {"retention", "window_efficacy", "specificity", "norm_growth", "log10_condition"}
    assert points[1]["median_plan_norm"] > 0 and points[1]["median_subject_norm"] > 0
    assert set(points[1]["room_used"]) == {str(layer) for layer in hp.layers}
    assert 0 <= points[1]["max_room_used"] <= points[-1]["max_room_used"] <= 1  # the constraint only grows
    assert points[-1]["retention_tested"] == 5 and points[1]["max_norm_growth"] > 0
    assert points[0]["specificity"] is not None and points[0]["max_norm_growth"] == 0.0  # the reference
    assert {p.name for p in whole.glob("*.png")} >= {"retention.png", "max_norm_growth.png", "log10_condition.png"}
    assert read_curves(whole / "curves.jsonl") == points  # what the table and plot scripts read
    with pytest.raises(FileNotFoundError):  # a mistyped curve file is an error, not an empty table
        read_curves(whole / "curve.jsonl")
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    assert [p.name for p in draw_curves(points, chosen, ("retention", "max_norm_growth"))] == [
        "retention.png",
        "max_norm_growth.png",
    ]
    assert sorted(p.name for p in chosen.iterdir()) == ["max_norm_growth.png", "retention.png"]  # only those asked for
    table = points_table(points, (2, 5, 7)).splitlines()
    assert [line.split(" | ")[:2] for line in table[2:]] == [
        ["| unedited", "0"],
        ["| alphaedit", "2"],
        ["| alphaedit", "5"],
    ]
    older = [{k: v for k, v in p.items() if k != "max_room_used"} for p in points]  # a curve from before the figure
    assert "room used" in table[0] and "room used" not in points_table(older, (2,)).splitlines()[0]
    run_lifelong(loaded, methods, records[:3], 1, 2, parts, None, [], progress=False)  # interrupted after 3
    with (parts / "curves.jsonl").open("a") as handle:  # killed after writing a point, before saving its state
        handle.write(json.dumps({"method": "alphaedit", "edits": 5, "retention": -1.0}) + "\n")
    resumed = run_lifelong(loaded, methods, records, 1, 2, parts, None, [], progress=False)
    assert -1.0 not in [p.get("retention") for p in resumed]  # the unsaved point was dropped and measured again
    assert len(list(parts.glob("resume-alphaedit-*-weights.safetensors"))) == 1  # earlier points' files removed
    assert [p["edits"] for p in resumed] == [0, 2, 3, 4, 5]  # the reference is measured once
    a, b = saved_weights(whole, "alphaedit"), saved_weights(parts, "alphaedit")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # as if never interrupted


def test_lifelong_points_measure_neighbour_shift_and_fluency_against_the_unedited_model(tiny_llama, tmp_path):
    """The locality figures the issue compares at 2,000 edits: the median |shift| of the fixed
    neighbourhood prompts' true-answer log-prob from the unedited model (0 at the reference), and
    fluency of the first ``fluency_n`` records' rewrite prompts, on the model as it is at each point."""
    from evaluation.lifelong import points_table, run_lifelong
    from evaluation.metrics import fluency, score_records

    loaded = load_model(tiny_llama[0], device="cpu")
    hp = EditHyperParams.from_file(tiny_llama[1]).with_changes(method="alphaedit")
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 4)
    records[1] = dataclasses.replace(records[1], neighborhood="The capital of Spain is", target_true="Madrid")
    prompts = [r.prompt for r in records[:2]]
    unedited = snapshot_weights(loaded, hp.layers)
    before = score_records(loaded.model, loaded.tokenizer, records, ("neighborhood",))
    fluent = fluency(loaded.model, loaded.tokenizer, prompts)
    out = tmp_path / "out"
    points = run_lifelong(loaded, {"alphaedit": hp}, records, 1, 4, out, None, [], progress=False, fluency_n=2)
    assert points[0]["neighbour_shift"] == 0.0 and points[0]["fluency"] == pytest.approx(fluent, abs=1e-6)
    editor = Editor(loaded, hp)
    editor.load_weights(saved_weights(out, "alphaedit"))
    after = score_records(loaded.model, loaded.tokenizer, records, ("neighborhood",))
    shifts = sorted(abs(a.neighborhood[1] - b.neighborhood[1]) for a, b in zip(after, before, strict=True))
    assert points[-1]["neighbour_shift"] == pytest.approx((shifts[1] + shifts[2]) / 2, abs=1e-5)
    assert points[-1]["neighbour_shift"] > 1e-4  # four edits moved the neighbours
    assert points[-1]["fluency"] == pytest.approx(fluency(loaded.model, loaded.tokenizer, prompts), abs=1e-6)
    editor.load_weights(unedited)
    assert "| nbr shift | fluency |" in points_table(points, (4,)).splitlines()[0]
    plain = run_lifelong(loaded, {"alphaedit": hp}, records, 1, 4, tmp_path / "plain", None, [], progress=False)
    assert plain[-1]["fluency"] is None and plain[-1]["neighbour_shift"] == points[-1]["neighbour_shift"]


def test_lifelong_points_count_what_the_model_says_of_earlier_corrections_and_at_each_edit(
    tiny_llama, tmp_path, monkeypatch
):
    """``retention_says`` / ``retention_first_says``: the share of the retention sample whose greedy
    continuation says its target; ``said_at_edit``: the share of the window's corrections said right
    after their batch (``RequestDiagnostics.says``). The tiny model says nothing, so both checks are
    scripted: the figures must be the shares of what they answered."""
    import engine.editor
    import evaluation.lifelong
    from evaluation.lifelong import points_table, run_lifelong

    loaded = load_model(tiny_llama[0], device="cpu")
    hp = EditHyperParams.from_file(tiny_llama[1]).with_changes(method="alphaedit")
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 4)
    at_edit = iter([[True], [False], [True], [True]])
    monkeypatch.setattr(engine.editor, "targets_said", lambda model, tokenizer, requests: next(at_edit))
    sample_sizes = []

    def hits(model: object, tokenizer: object, chosen: list, parts: tuple[str, ...]) -> dict[str, list[bool]]:
        sample_sizes.append(len(chosen))
        return {"rewrite": [i % 4 != 1 for i in range(len(chosen))]}

    monkeypatch.setattr(evaluation.lifelong, "generation_hits", hits)
    points = run_lifelong(loaded, {"alphaedit": hp}, records, 1, 4, tmp_path / "out", None, [], progress=False)
    assert sample_sizes == [4]
    assert points[-1]["retention_says"] == 75.0 and points[-1]["retention_first_says"] == 75.0
    assert points[-1]["said_at_edit"] == 75.0
    header = points_table(points, (4,)).splitlines()[0]
    assert "| retained says % | first 100 says % |" in header and "| said at edit % |" in header


def test_lifelong_resume_derives_the_refused_records_a_meta_from_before_their_tracking_lacks(tiny_llama, tmp_path):
    """The tokenizer merges record 2's subject ("Fran" of "France") with the text after it, so the
    editor refuses it; a resume meta without the ``failed`` list gets it back from the editor's
    own refusal (re-keying needs it), and a meta whose state does not hold exactly the other
    records is refused instead of guessed at."""
    from evaluation.lifelong import run_lifelong

    loaded = load_model(tiny_llama[0], device="cpu")
    hp = EditHyperParams.from_file(tiny_llama[1]).with_changes(method="alphaedit")
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 5)
    records[2] = dataclasses.replace(records[2], prompt="The capital of France is", subject="Fran")
    out = tmp_path / "old"
    run_lifelong(loaded, {"alphaedit": hp}, records[:4], 1, 4, out, None, [], progress=False)
    meta_path = out / "resume-alphaedit.json"
    meta = json.loads(meta_path.read_text())
    assert meta["failed"] == [2]
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "failed"}))
    resumed = run_lifelong(loaded, {"alphaedit": hp}, records, 1, 4, out, None, [], progress=False, rekey_every=5)
    assert resumed[-1]["edits"] == 5 and resumed[-1]["rekeyed"] is True
    assert json.loads(meta_path.read_text())["failed"] == [2]
    lying = tmp_path / "lying"
    run_lifelong(loaded, {"alphaedit": hp}, records[:4], 1, 4, lying, None, [], progress=False)
    meta = json.loads((lying / "resume-alphaedit.json").read_text())
    (lying / "resume-alphaedit.json").write_text(
        json.dumps({"edits": 3, "weights": meta["weights"], "state": meta["state"]})
    )
    with pytest.raises(ValueError, match="cannot be derived: 3 records, 1 refused, but the state applied 3"):
        run_lifelong(loaded, {"alphaedit": hp}, records, 1, 4, lying, None, [], progress=False)


def test_lifelong_methods_take_turns_without_touching_each_others_weights(tiny_llama, tmp_path):

    from evaluation.lifelong import run_lifelong

    loaded = load_model(tiny_llama[0], device="cpu")
    hp = EditHyperParams.from_file(tiny_llama[1])
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 5)
    both = {"alphaedit": hp.with_changes(method="alphaedit"), "memit": hp.with_changes(method="memit")}
    points = run_lifelong(loaded, both, records, 1, 2, tmp_path / "both", None, [], progress=False)
    turns = [(p["method"], p["edits"]) for p in points[1:5]]
    assert turns == [("alphaedit", 2), ("memit", 2), ("alphaedit", 4), ("memit", 4)]
    for method, hparams in both.items():
        alone = run_lifelong(loaded, {method: hparams}, records, 1, 2, tmp_path / method, None, [], progress=False)
        mine = [p["retention"] for p in alone if p["method"] == method]
        assert mine == [p["retention"] for p in points if p["method"] == method]
        a, b = saved_weights(tmp_path / "both", method), saved_weights(tmp_path / method, method)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bench_lifelong_from_the_command_line(tiny_llama, tmp_path):
    model, hparams = tiny_llama
    data = counterfact_file(tmp_path / "cf.json")
    out = tmp_path / "curves"
    args = ["--home", str(tmp_path / "home"), "bench", "--data", str(data), "--n", "4", "--methods", "memit"]
    args += ["--model", str(model), "--hparams", str(hparams), "--device", "cpu", "--threads", "1"]
    result = CliRunner().invoke(main, [*args, "--lifelong", "--eval-every", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"3 points in {out / 'curves.jsonl'}; plots in {out}"
    table = result.stdout.splitlines()[-5:-1]  # the unedited reference and the method at its last point
    assert table[0].startswith("| method | edits | retained % |") and table[2].startswith("| unedited | 0 |")
    assert table[3].startswith("| memit | 4 | ")
    assert [json.loads(line)["edits"] for line in (out / "curves.jsonl").read_text().splitlines()] == [0, 2, 4]
    refused = CliRunner().invoke(main, [*args, "--lifelong"])
    assert refused.exit_code == 2 and "--lifelong needs --out DIR" in refused.output


def test_lifelong_rekeying_rebuilds_the_constraints_at_its_points_and_resumes_with_them(tiny_llama, tmp_path):
    """``--rekey-every``: the saved state after a re-keying point holds the applied corrections'
    keys as the model reads them then, and a resumed run goes on from that state."""
    from evaluation.lifelong import run_lifelong

    loaded = load_model(tiny_llama[0], device="cpu")
    hp = EditHyperParams.from_file(tiny_llama[1]).with_changes(method="alphaedit")
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 5)
    out = tmp_path / "rekeyed"
    unedited = snapshot_weights(loaded, hp.layers)
    points = run_lifelong(loaded, {"alphaedit": hp}, records[:4], 1, 2, out, None, [], progress=False, rekey_every=4)
    assert [p.get("rekeyed", False) for p in points[1:]] == [False, True]  # at 4, not at 2
    meta = json.loads((out / "resume-alphaedit.json").read_text())
    saved = EditorState.load(out / meta["state"])
    editor = Editor(loaded, hp)
    editor.load_weights(saved_weights(out, "alphaedit"))
    want = editor.rekey(saved, [r.request() for r in records[:4]])
    editor.load_weights(unedited)
    for layer in hp.layers:
        torch.testing.assert_close(saved.constraints[layer], want.constraints[layer], atol=1e-5, rtol=1e-5)
    run_lifelong(loaded, {"alphaedit": hp}, records[:4], 1, 2, tmp_path / "plain", None, [], progress=False)
    unkeyed = EditorState.load(
        tmp_path / "plain" / json.loads((tmp_path / "plain" / "resume-alphaedit.json").read_text())["state"]
    )
    last = hp.last_layer
    assert not torch.allclose(saved.constraints[last], unkeyed.constraints[last], atol=1e-5, rtol=1e-5)
    resumed = run_lifelong(loaded, {"alphaedit": hp}, records, 1, 2, out, None, [], progress=False, rekey_every=4)
    assert [p["edits"] for p in resumed] == [0, 2, 4, 5] and resumed[-1]["retention"] is not None


def test_lifelong_rehearsal_applies_again_what_the_model_no_longer_says_and_resumes_with_it(
    tiny_llama, tmp_path, monkeypatch
):
    """``--rehearse-every``: after a point, the applied corrections greedy decoding no longer
    begins with are applied again (the point itself is measured before); the state counts them,
    the meta lists them so a resumed run (and a re-keying) goes on from the same life."""
    import evaluation.lifelong
    from evaluation.lifelong import run_lifelong

    loaded = load_model(tiny_llama[0], device="cpu")
    hp = EditHyperParams.from_file(tiny_llama[1]).with_changes(method="alphaedit")
    records = load_counterfact(counterfact_file(tmp_path / "cf.json"), 5)
    tested: list[list[str]] = []

    def said(model: object, tokenizer: object, requests: list) -> list[bool]:
        tested.append([r.subject for r in requests])
        return [i % 2 == 1 for i in range(len(requests))]  # the 1st, 3rd ... are no longer said

    monkeypatch.setattr(evaluation.lifelong, "targets_said", said)
    whole = tmp_path / "whole"
    kwargs = {"progress": False, "rehearse_every": 2, "rekey_every": 4}
    points = run_lifelong(loaded, {"alphaedit": hp}, records, 1, 2, whole, None, [], **kwargs)
    subjects = [r.subject for r in records]
    assert tested == [subjects[:2], subjects[:4]]  # at 2 and 4; not at 5 (no multiple of 2 passed)
    assert [(p.get("rehearsed"), p.get("rehearsal_unsaid")) for p in points[1:]] == [(1, 50.0), (2, 50.0), (None, None)]
    assert points[2]["rehearsed_total"] == 3 and points[2]["rekeyed"]  # re-keying counts the rehearsed keys
    meta = json.loads((whole / "resume-alphaedit.json").read_text())
    assert meta["rehearsed"] == [0, 0, 2]
    assert EditorState.load(whole / meta["state"]).edits == 5 + 3
    plain = run_lifelong(loaded, {"alphaedit": hp}, records, 1, 2, tmp_path / "plain", None, [], progress=False)
    a, b = saved_weights(whole, "alphaedit"), saved_weights(tmp_path / "plain", "alphaedit")
    assert not all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the rehearsals changed the weights
    assert points[1]["norm_growth"] == plain[1]["norm_growth"]  # the point at 2 is measured before its rehearsal
    assert points[2]["norm_growth"] != plain[2]["norm_growth"]
    parts = tmp_path / "parts"
    run_lifelong(loaded, {"alphaedit": hp}, records[:3], 1, 2, parts, None, [], **kwargs)  # interrupted after 3
    run_lifelong(loaded, {"alphaedit": hp}, records, 1, 2, parts, None, [], **kwargs)
    assert json.loads((parts / "resume-alphaedit.json").read_text())["rehearsed"] == [0, 0, 2]
    c = saved_weights(parts, "alphaedit")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)  # as if never interrupted
