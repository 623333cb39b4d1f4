"""Fuzzing `metake submit --file` with random files: each is imported whole or refused whole, and
every refusal is one line on stderr with nothing written (SQLite; the intake is backend-neutral)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import main

text_value = st.text(max_size=12) | st.sampled_from(["{} is", "The capital of {} is", "", " ", "\u200b", "x{}"])
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | text_value,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_value, inner, max_size=3),
    max_leaves=8,
)
record = st.fixed_dictionaries(
    {},
    optional={"prompt": text_value, "subject": text_value, "target": text_value, "priority": json_value},
) | st.dictionaries(text_value, json_value, max_size=4)
as_lines = st.lists(record, min_size=1, max_size=5).map(lambda rs: "".join(json.dumps(r) + "\n" for r in rs))
raw = st.binary(max_size=80).map(lambda b: b.decode("utf-8", errors="replace"))
files = as_lines | raw | st.lists(record, max_size=4).map(json.dumps)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "home"
    assert CliRunner().invoke(main, ["--home", str(folder), "init"]).exit_code == 0
    return folder


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=files)
def test_a_random_file_is_imported_whole_or_refused_in_one_line(home, tmp_path, content):
    path = tmp_path / "corrections.jsonl"
    path.write_text(content, encoding="utf-8")
    run = CliRunner()
    count = lambda: len(json.loads(run.invoke(main, ["--home", str(home), "history", "--json"]).stdout))  # noqa: E731
    before = count()
    result = run.invoke(main, ["--home", str(home), "submit", "--file", str(path)])
    after = count()
    if result.exit_code == 0:
        queued = int(result.stderr.split()[1])  # stderr: "queued N correction(s) from FILE"; stdout: the ids
        assert result.stderr.startswith("queued ") and len(result.stdout.split()) == queued
        assert after == before + queued
        return
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert after == before  # a refused file writes nothing
    first, *rest = result.stderr.splitlines()
    assert first.startswith("Error: ")
    assert all(line.startswith("  line ") for line in rest), result.stderr  # one line per bad record
