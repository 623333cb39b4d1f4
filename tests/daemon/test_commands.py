"""The daemon's commands in process: bad input is one line and writes nothing; demo and export work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM

from cli import main
from storage.db import make_engine, session_factory
from storage.models import AuditEvent, Checkpoint, Correction, DaemonLease, RevertRequest

TABLES = (Correction, Checkpoint, AuditEvent, DaemonLease, RevertRequest)


@pytest.fixture
def home(tmp_path: Path, tiny_stats: Path) -> Path:
    root = tmp_path / "home"
    root.mkdir()
    (root / "stats").symlink_to(tiny_stats, target_is_directory=True)
    return root


@pytest.fixture
def metake(home: Path, db_url: str):
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(main, ["--home", str(home), "--db", db_url, *args])

    return run


def counts(db_url: str) -> dict[str, int]:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            return {t.__tablename__: session.scalar(select(func.count()).select_from(t)) or 0 for t in TABLES}
    finally:
        engine.dispose()


def one_line_error(result, message: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    assert result.stderr.splitlines()[-1].startswith("Error: "), result.stderr
    assert message in result.stderr.splitlines()[-1], result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["daemon", "--interval", "5", "--schedule", "0 2 * * *"], "give --interval or --schedule, not both", 2),
        (["daemon", "--interval", "0"], "--interval must be positive", 2),
        (["daemon", "--timezone", "UTC"], "--timezone only applies to --schedule", 2),
        (["daemon", "--schedule", "0 2 * * 0"], "write the day of the week as mon..sun", 1),
        (["daemon", "--schedule", "0 2 * * * * *"], "expected 5 fields", 1),
        (["apply", "--batch-size", "0"], "--batch-size must be at least 1", 1),
        (["apply", "--keep-last", "0"], "--keep-last must be at least 1", 1),
        (["apply", "--hparams", "/no/such.toml"], "--hparams /no/such.toml is not a file", 1),
        (["apply", "--model", "/no/such/model"], "--model /no/such/model does not exist", 1),
        (["apply", "--device", "tpu:banana"], "is not a torch device", 1),
        (["apply", "--max", "0"], "Invalid value for '--max'", 2),
        (["revert", "7"], "no checkpoint with id 7", 1),
        (["export", "7", "--out", "somewhere"], "no checkpoint with id 7", 1),
        (["export", "--out", "somewhere"], "model 'default' has no checkpoints yet", 1),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(metake, home, db_url, args, message, code):
    before = counts(db_url)
    one_line_error(metake(*args), message, code)
    assert counts(db_url) == before
    assert not (home / "models").exists() and not (home / "checkpoints").exists()  # no model was loaded


def test_a_cuda_device_on_a_machine_without_one_is_refused(metake, db_url, tiny_args):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = counts(db_url)
    args = [a if a != "cpu" else "cuda" for a in tiny_args]
    one_line_error(metake("apply", *args), "--device cuda: no CUDA device is available here")
    assert counts(db_url) == before


def test_apply_then_export_writes_a_model_transformers_loads(metake, home, tiny, tiny_args, tmp_path, one_thread):
    assert (
        metake("submit", "--prompt", "The capital of {} is", "--subject", "France", "--target", "Rome").exit_code == 0
    )
    result = metake("apply", *tiny_args)
    assert result.exit_code == 0, result.output
    assert result.stdout == "applied 1 correction(s) in 1 batch(es); 0 rejected, 0 failed, 0 to retry\n"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("keep me")
    one_line_error(metake("export", "--out", str(occupied), "--model", str(tiny[0])), "already exists")
    assert (occupied / "x").read_text() == "keep me"

    out = tmp_path / "exported"
    result = metake("export", "--out", str(out), "--model", str(tiny[0]))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"exported checkpoint 2 to {out}\n"
    note = json.loads((out / "metake-export.json").read_text())
    assert note["checkpoint"] == 2 and note["manifest"]["applied_corrections"] == [1]
    exported = AutoModelForCausalLM.from_pretrained(out)
    checkpoint = json.loads(metake("checkpoints", "--json").stdout)[-1]
    saved = load_file(home / "checkpoints" / checkpoint["path"])
    for name in note["edited_parameters"]:
        assert torch.equal(exported.get_parameter(name), saved[f"weight/{name}"])
    original = AutoModelForCausalLM.from_pretrained(tiny[0])
    assert any(not torch.equal(exported.get_parameter(n), original.get_parameter(n)) for n in note["edited_parameters"])


def test_demo_runs_in_its_own_home_and_starts_afresh_each_time(metake, tiny, tmp_path, tiny_stats, one_thread):
    demo_home = tmp_path / "demo"
    demo_home.mkdir()
    (demo_home / "stats").symlink_to(tiny_stats, target_is_directory=True)
    model, hparams = tiny
    args = ["demo", "--home", str(demo_home), "--model", str(model), "--hparams", str(hparams), "--device", "cpu"]
    for _ in range(2):
        result = metake(*args)
        assert result.exit_code == 0, result.output
        assert "submitted 3 CounterFact corrections" in result.stdout
        assert "Magnus Carlsen, who holds a citizenship from  Chile       Norway" in result.stdout
        assert "audit chain: verified" in result.stdout
        history = CliRunner().invoke(main, ["--home", str(demo_home), "history", "--json"])
        assert [c["id"] for c in json.loads(history.stdout)] == [1, 2, 3]  # a fresh database each run
    real_home = tmp_path / "real-home"
    assert CliRunner().invoke(main, ["--home", str(real_home), "init"]).exit_code == 0
    one_line_error(
        metake("demo", "--home", str(real_home), "--model", str(model), "--hparams", str(hparams)),
        "holds a metake database the demo did not create",
    )
