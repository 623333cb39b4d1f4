"""The whole product on the real default model, through the command line in subprocesses.

Submit three real CounterFact corrections, let the daemon drain the queue, read the history with
its metrics, revert to the checkpoint after the first correction, and export the result for
transformers. Minutes on a CPU: the model's statistics come from a small text file (and are
cached for the session in ``model_cache``) instead of text the model writes itself.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from daemon_helpers import Metake, base_env, log_has, wait_for
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.checkpoint_files import read_checkpoint
from daemon.demo_facts import DEMO_RECORDS
from engine.scoring import completion_scores

pytestmark = pytest.mark.slow
DRAIN_S = 2700  # three real edits; a busy 2-core CPU has needed over ten minutes


@pytest.fixture
def real(tmp_path: Path, model_cache: Path, test_data: Path) -> tuple[Metake, list[str]]:
    """``metake`` on a home sharing the session's model cache, and the model options to pass."""
    home = tmp_path / "home"
    home.mkdir()
    for sub in ("models", "stats"):
        (home / sub).symlink_to(model_cache / sub, target_is_directory=True)
    hparams = tmp_path / "hparams.toml"
    corpus = test_data / "wikitext-2-raw-test-head.raw"
    defaults = (Path(__file__).resolve().parents[2] / "engine" / "defaults" / "llama.toml").read_text()
    stats = defaults.index("[stats]")
    hparams.write_text(defaults[:stats] + f'[stats]\nsource = "{corpus}"\nn_tokens = 20000\n')
    metake = Metake(home, f"sqlite:///{home / 'metake.sqlite3'}", base_env())
    return metake, ["--hparams", str(hparams), "--device", "cpu", "--no-progress"]


def checkpoint_weights(metake: Metake, checkpoint: dict) -> dict[str, torch.Tensor]:
    path = metake.home / "checkpoints" / checkpoint["path"]
    return read_checkpoint(path, checkpoint["sha256"], f"checkpoint {checkpoint['id']}", "cpu").weights


def facts_hold(model, tokenizer) -> list[bool]:
    """For each demo fact: is the new answer more likely than the true one on its prompt?"""
    prompts = [r["prompt"] for r in DEMO_RECORDS]
    new = completion_scores(model, tokenizer, prompts, [r["target_new"] for r in DEMO_RECORDS])
    old = completion_scores(model, tokenizer, prompts, [r["ground_truth"] for r in DEMO_RECORDS])
    return [n > o for n, o in zip(new, old, strict=True)]


def test_daemon_applies_reverts_and_exports_real_corrections(real: tuple[Metake, list[str]], tmp_path: Path):
    metake, options = real
    metake.ok("init")
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(dict(record)) + "\n" for record in DEMO_RECORDS))
    assert metake.ok("submit", "--file", str(facts)).split() == ["1", "2", "3"]

    log = tmp_path / "daemon.log"
    daemon = metake.start("daemon", "--interval", "1", *options, log=log)
    try:
        wait_for(lambda: log_has(log, "event=batch_applied", "corrections=3"), DRAIN_S, "the queue to drain", 2)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    history = json.loads(metake.ok("history", "--json"))
    assert [c["status"] for c in history] == ["applied"] * 3
    for correction in history:
        figures = {(m["name"], m["phase"]): m["value"] for m in correction["metrics"]}
        assert figures[("target_prob", "post")] > figures[("target_prob", "pre")]
        assert (figures[("efficacy", "pre")], figures[("efficacy", "post")]) == (0.0, 1.0), correction["subject"]
        assert {("paraphrase_target_prob", "pre"), ("neighbor_kept", "post"), ("realised_gain", "post")} <= set(figures)
        assert figures[("passes", "post")] == 1.0 and figures[("says", "post")] in (0.0, 1.0)  # max_passes 1
    checkpoints = json.loads(metake.ok("checkpoints", "--json"))
    assert [(c["id"], c["parent_id"], c["manifest"]["corrections"]) for c in checkpoints] == [
        (1, None, []),
        (2, 1, [1]),
        (3, 2, [2]),
        (4, 3, [3]),
    ]
    after_first = checkpoints[1]

    assert metake.ok("revert", str(after_first["id"])) == "1\n"
    applied = metake.ok("apply", *options)
    assert "1 revert(s) performed" in applied
    history = json.loads(metake.ok("history", "--json"))
    assert [c["status"] for c in history] == ["applied", "reverted", "reverted"]
    checkpoints = json.loads(metake.ok("checkpoints", "--json"))
    head = checkpoints[-1]
    assert (head["parent_id"], head["manifest"]["kind"]) == (after_first["id"], "revert")
    restored = checkpoint_weights(metake, after_first)
    assert all(torch.equal(weights, restored[name]) for name, weights in checkpoint_weights(metake, head).items())

    out = tmp_path / "exported"
    assert metake.ok("export", "--out", str(out)).startswith(f"exported checkpoint {head['id']} to ")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    for name, weights in restored.items():
        assert torch.equal(model.get_parameter(name), weights), name
    assert facts_hold(model, tokenizer) == [True, False, False]
    first = DEMO_RECORDS[0]
    encoded = tokenizer(first["prompt"], return_tensors="pt")
    generated = model.generate(**encoded, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert first["target_new"] in continuation, continuation
