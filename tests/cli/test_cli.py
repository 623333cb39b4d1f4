"""The `metake` command line: submitting, listing and showing, and every bad-input case.

Every rejected command must print exactly one line on stderr (a file's list of bad records
aside), exit non-zero, and leave every table as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy
import sqlalchemy.exc
from click.testing import CliRunner
from sqlalchemy import update

import storage.db
import storage.imports
from cli import main
from storage.audit import CHAIN_LOCK_KEY, append_event
from storage.busy import announce_import, running_import
from storage.checkpoints import audit_checkpoint
from storage.db import read_only
from storage.imports import stage_chunk, start_import
from storage.intake import make_correction
from storage.models import Checkpoint, Correction, DaemonLease, Edit, Metric, Phase
from storage.queue import claim_batch, mark_applied

PROMPT = "The mother tongue of {} is"
DARRIEUX = ["--prompt", PROMPT, "--subject", "Danielle Darrieux"]
NOTHING = {"corrections": 0, "edits": 0, "metrics": 0, "checkpoints": 0, "audit_events": 0}


def submit_ok(metake, *args: str) -> int:
    result = metake("submit", *args)
    assert result.exit_code == 0, result.output
    return int(result.stdout)


def one_line_error(result, message: str, exit_code: int = 1) -> None:
    assert result.exit_code == exit_code, result.output
    assert result.stderr == f"Error: {message}\n"
    assert result.stdout == ""


def test_submit_prints_the_new_id_and_records_every_field(metake):
    new_id = submit_ok(
        metake,
        *DARRIEUX,
        "--target",
        "English",
        "--original",
        "French",
        "--paraphrase",
        "Danielle Darrieux speaks",
        "--paraphrase",
        "Danielle Darrieux grew up speaking",
        "--neighbor",
        "The mother tongue of Léon Blum is=>French",
        "--priority",
        "7",
        "--as",
        "alice",
    )
    assert new_id == 1
    shown = json.loads(metake("show", "1", "--json").stdout)
    assert len(shown) == 1
    record = shown[0]
    assert {k: record[k] for k in ("id", "status", "prompt", "subject", "target", "original_answer")} == {
        "id": 1,
        "status": "pending",
        "prompt": PROMPT,
        "subject": "Danielle Darrieux",
        "target": "English",
        "original_answer": "French",
    }
    assert record["paraphrases"] == ["Danielle Darrieux speaks", "Danielle Darrieux grew up speaking"]
    assert record["neighbors"] == [{"prompt": "The mother tongue of Léon Blum is", "answer": "French"}]
    assert (record["priority"], record["submitter"], record["attempts"]) == (7, "alice", 0)
    assert [(e["kind"], e["actor"]) for e in record["events"]] == [("submitted", "alice")]
    assert record["edit"] is None and record["metrics"] == []


def test_resubmitting_a_fact_supersedes_and_queue_shows_claim_order(metake):
    submit_ok(metake, *DARRIEUX, "--target", "English")
    submit_ok(metake, "--prompt", "{} was born in", "--subject", "Danielle Darrieux", "--target", "Bordeaux")
    submit_ok(metake, *DARRIEUX, "--target", "German", "--priority", "2")
    queued = json.loads(metake("queue", "--json").stdout)
    assert [(r["id"], r["status"], r["target"]) for r in queued] == [
        (3, "pending", "German"),
        (2, "pending", "Bordeaux"),
    ]
    superseded = json.loads(metake("queue", "--status", "superseded", "--json").stdout)
    assert [(r["id"], r["superseded_by"]) for r in superseded] == [(1, 3)]
    table = metake("queue").stdout.splitlines()
    assert table[0].split() == [
        "id",
        "status",
        "prio",
        "tries",
        "submitted",
        "(UTC)",
        "by",
        "prompt",
        "target",
    ]
    assert table[1].startswith("3   pending  2")
    assert table[1].endswith("The mother tongue of Danielle Darrieux is  German")
    story = metake("show", "1").stdout
    assert "correction 1: superseded" in story
    assert "superseded by:   3" in story


def test_history_filters_by_subject_status_and_time(metake, sessions):
    submit_ok(metake, *DARRIEUX, "--target", "English")
    submit_ok(metake, "--prompt", "{} plays", "--subject", "Toko Yasuda", "--target", "piano")
    submit_ok(metake, "--prompt", "{} plays", "--subject", "Toko Yasuda", "--target", "drums")
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    with sessions.begin() as session:
        session.execute(update(Correction).where(Correction.id == 1).values(submitted_at=long_ago))

    def ids(*args: str) -> list[int]:
        result = metake("history", "--json", *args)
        assert result.exit_code == 0, result.output
        return [row["id"] for row in json.loads(result.stdout)]

    assert ids() == [1, 2, 3]
    assert ids("--subject", "Toko Yasuda") == [2, 3]
    assert ids("--status", "superseded") == [2]
    assert ids("--status", "PENDING", "--status", "superseded") == [1, 2, 3]
    assert ids("--since", "2021-01-01") == [2, 3]
    assert ids("--until", "2020-01-01T00:00:01Z") == [1]
    assert ids("--until", "2020-01-01") == []
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert ids("--since", "2019-12-31T23:00:00-01:00", "--until", tomorrow, "--limit", "2") == [1, 2]


def test_show_tells_the_whole_story_with_edit_and_metrics(metake, sessions):
    submit_ok(metake, *DARRIEUX, "--target", "English", "--original", "French")
    with sessions.begin() as session:
        batch = claim_batch(session, 1, "daemon-1")
        before = Checkpoint(path="checkpoints/0.safetensors", sha256="a" * 64, size_bytes=100, base_model="smollm2")
        session.add(before)
        session.flush()
        after = Checkpoint(
            parent_id=before.id,
            path="checkpoints/1.safetensors",
            sha256="b" * 64,
            size_bytes=100,
            base_model="smollm2",
        )
        session.add(after)
        session.flush()
        edit = Edit(
            method="metake",
            model="smollm2",
            layers=[3, 4, 5],
            checkpoint_before_id=before.id,
            checkpoint_after_id=after.id,
        )
        session.add(edit)
        session.flush()
        session.add_all(
            [
                Metric(edit_id=edit.id, correction_id=1, name="p_target", phase=Phase.PRE, value=0.01),
                Metric(edit_id=edit.id, correction_id=1, name="p_target", phase=Phase.POST, value=0.93),
                Metric(edit_id=edit.id, correction_id=None, name="locality", phase=Phase.POST, value=0.99),
            ]
        )
        mark_applied(session, batch, edit.id, worker="daemon-1")
        audit_checkpoint(session, before, "daemon-1")
        audit_checkpoint(session, after, "daemon-1", edit_id=edit.id)
    record = json.loads(metake("show", "1", "--json").stdout)[0]
    assert record["status"] == "applied"
    assert [e["kind"] for e in record["events"]] == ["submitted", "claimed", "applied", "checkpoint_written"]
    assert (record["edit"]["layers"], record["edit"]["checkpoint_after_id"]) == ([3, 4, 5], 2)
    assert [(m["name"], m["phase"], m["value"]) for m in record["metrics"]] == [
        ("locality", "post", 0.99),
        ("p_target", "post", 0.93),
        ("p_target", "pre", 0.01),
    ]
    text = metake("show", "1").stdout
    assert "edit 1: metake on smollm2, layers [3, 4, 5]" in text
    assert "checkpoint 1 -> 2" in text
    checkpoints = json.loads(metake("checkpoints", "--json").stdout)
    assert [(c["id"], c["status"], c["parent_id"]) for c in checkpoints] == [
        (1, "kept", None),
        (2, "kept", 1),
    ]
    second_row = metake("checkpoints").stdout.splitlines()[2].split()
    assert second_row[:2] + second_row[4:7] == ["2", "1", "100", "bbbbbbbbbbbb", "kept"]
    assert metake("audit", "verify").stdout == (
        "audit chain verified: 5 events\nrows match their events: 1 corrections, 2 checkpoints, 1 edits\n"
    )


def test_status_on_a_fresh_database_says_nothing_happened_yet(metake):
    assert metake("status").stdout.splitlines() == [
        "model       none edited yet (no checkpoint); start `metake daemon` or run `metake apply`",
        "queue       pending 0, applying 0, applied 0, failed 0, rejected 0, superseded 0, reverted 0",
        "last edit   none applied yet",
        "health      no check yet",
        "audit       0 events, newest verify: empty",
    ]


def test_status_shows_a_running_import_and_its_staged_corrections(metake, sessions):
    with sessions.begin() as session:
        import_id = start_import(session, 5000, "bob", model="default", source="big.jsonl").id
    with sessions.begin() as session:
        stage_chunk(session, import_id, [make_correction(PROMPT, "Danielle Darrieux", "English")], "bob", "default")
    lines = metake("status").stdout.splitlines()
    assert "staged 1" in lines[1] and "abandoned" not in lines[1]
    assert re.fullmatch(
        rf"import      {import_id} by bob for default: 1 of 5000 staged, started \d+ s ago \(.+\), "
        r"last chunk \d+ s ago \(.+\)",
        lines[2],
    ), lines[2]
    found = json.loads(metake("status", "--json").stdout)["imports"]
    assert [(i["id"], i["records"], i["staged"], i["submitter"]) for i in found] == [(import_id, 5000, 1, "bob")]


def test_status_shows_model_daemon_queue_checkpoint_health_and_audit(metake, sessions, engine):
    first = submit_ok(metake, *DARRIEUX, "--target", "English")
    submit_ok(metake, "--prompt", "The capital of {} is", "--subject", "France", "--target", "Rome")
    now = datetime.now(UTC)
    with sessions.begin() as session:
        batch = claim_batch(session, 1, "host-1")
        manifest = {"kind": "edit", "model_source": "default", "method": "metake", "edits": 1}
        manifest["hparams"] = {"layers": [4, 5, 6, 7, 8]}
        checkpoint = Checkpoint(
            path="m/1.safetensors", sha256="a" * 64, size_bytes=64_900_000, base_model="sha256:" + "ab" * 32
        )
        checkpoint.manifest = manifest
        checkpoint.created_at = now - timedelta(minutes=3)
        session.add(checkpoint)
        session.flush()
        edit = Edit(method="metake", model="m", layers=[4], checkpoint_after_id=checkpoint.id, finished_at=now)
        session.add(edit)
        session.flush()
        mark_applied(session, batch, edit.id, worker="host-1")
        audit_checkpoint(session, checkpoint, "host-1", edit_id=edit.id)
        payload = {"retention": 0.95, "gen_retention": 0.9, "tested": 20, "perplexity": 16.2, "base_perplexity": 16.0}
        payload["perplexity_ratio"] = 16.2 / 16.0
        append_event(session, "health_checked", actor="host-1", edit_id=edit.id, payload=payload)
        session.add(
            DaemonLease(
                model=checkpoint.model,
                holder="host-1",
                acquired_at=now - timedelta(hours=2),
                renewed_at=now,
                expires_at=now + timedelta(seconds=50),
            )
        )
    lines = metake("status").stdout.splitlines()
    expected = "model       default: sha256:abababababababab (default), method metake, layers 4-8, 1 edits, 1 pending"
    assert lines[0] == expected
    assert lines[1].startswith("daemon      host-1 since 2 h ago (") and lines[1].endswith("s")
    assert lines[2].startswith("checkpoint  1 (edit), 3 min ago (") and lines[2].endswith("), 64.9 MB")
    assert lines[3] == "queue       pending 1, applying 0, applied 1, failed 0, rejected 0, superseded 0, reverted 0"
    assert lines[4].startswith(f"last edit   correction {first} (Danielle Darrieux -> English), 0 s ago")
    assert lines[5].startswith("health      0 s ago (") and lines[5].endswith(
        "), retention 95% of 20 re-tested, 90% still said when generating, perplexity 16.20 (+1.2% from unedited)"
    )
    assert lines[6] == "audit       6 events, newest verify: ok"
    as_json = json.loads(metake("status", "--json").stdout)
    assert as_json["models"][0]["lease"]["holder"] == "host-1" and as_json["queue"]["applied"] == 1
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("UPDATE audit_events SET actor = 'mallory' WHERE id = 5"))
    assert metake("status").stdout.splitlines()[6] == (
        "audit       6 events, newest verify: broken at event 5: "
        "its contents do not match its hash (the row was altered)"
    )


def test_submit_file_json_lines_and_counterfact(metake, tmp_path):
    lines = tmp_path / "corrections.jsonl"
    lines.write_text(
        json.dumps({"prompt": PROMPT, "subject": "Danielle Darrieux", "target": "English", "priority": 4})
        + "\n\n"
        + json.dumps(
            {
                "case_id": 8,
                "prompt": "What is the twin city of Wellington? It is",
                "target_new": "Sheffield",
                "subject": "Wellington",
                "ground_truth": "Sydney",
                "rephrase_prompt": "Wellington's twin city has famous tourist attractions including",
                "locality_prompt": "The twin city of Seoul is",
                "locality_ground_truth": "Sydney",
            }
        )
        + "\n"
    )
    result = metake("submit", "--file", str(lines), "--priority", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "1\n2\n"
    assert result.stderr == f"queued 2 correction(s) from {lines}\n"
    rows = json.loads(metake("history", "--json").stdout)
    assert [(r["prompt"], r["priority"], r["source"], r["original_answer"]) for r in rows] == [
        (PROMPT, 4, None, None),
        ("What is the twin city of {}? It is", 1, "counterfact:8", "Sydney"),
    ]


def test_submit_file_from_stdin_as_json_list(metake):
    records = [{"prompt": "{} plays", "subject": f"Player {i}", "target": "piano"} for i in range(3)]
    result = metake("submit", "--file", "-", input=json.dumps(records))
    assert (result.exit_code, result.stdout) == (0, "1\n2\n3\n")


# --- bad input: one line on stderr, non-zero exit, nothing written ------------------------------

BAD_SUBMISSIONS = [
    pytest.param(
        ["--prompt", "The mother tongue is", "--subject", "Danielle Darrieux", "--target", "English"],
        "the prompt has no '{}' where the subject goes",
        id="subject-absent-from-template",
    ),
    pytest.param(
        [
            "--prompt",
            "The mother tongue of Danielle Darrieux is",
            "--subject",
            "Danielle Darrieux",
            "--target",
            "English",
        ],
        "the prompt has no '{}' where the subject goes; write '{}' in place of 'Danielle Darrieux'",
        id="subject-written-out",
    ),
    pytest.param(
        ["--prompt", "{} and {} speak", "--subject", "Danielle Darrieux", "--target", "English"],
        "the prompt has 2 '{}' placeholders; exactly one is allowed",
        id="two-placeholders",
    ),
    pytest.param([*DARRIEUX, "--target", ""], "the target is empty", id="empty-target"),
    pytest.param(
        [*DARRIEUX, "--target", " \t "],
        "the target contains a control character (U+0009) at character 2",
        id="whitespace-and-tab-target",
    ),
    pytest.param([*DARRIEUX, "--target", "   "], "the target is empty", id="whitespace-target"),
    pytest.param(
        [*DARRIEUX, "--target", "Eng\x1blish"],
        "the target contains a control character (U+001B) at character 4",
        id="control-character",
    ),
    pytest.param(
        ["--prompt", "The mother\ntongue of {} is", "--subject", "Danielle Darrieux", "--target", "English"],
        "the prompt contains a control character (U+000A) at character 11",
        id="newline-in-prompt",
    ),
    pytest.param(
        ["--prompt", "x" * 999 + " {}", "--subject", "Danielle Darrieux", "--target", "English"],
        "the prompt is 1002 characters long; the limit is 1000",
        id="prompt-too-long",
    ),
    pytest.param(
        [*DARRIEUX, "--target", "E" * 201],
        "the target is 201 characters long; the limit is 200",
        id="target-too-long",
    ),
    pytest.param(
        [*DARRIEUX, "--target", "English", "--neighbor", "no arrow"],
        "--neighbor 'no arrow' is not of the form 'PROMPT=>ANSWER'",
        id="neighbor-without-arrow",
    ),
    pytest.param(
        [*DARRIEUX, "--target", "English", "--paraphrase", "{} speaks"],
        "the paraphrase 1 contains '{}'; write the subject out in full",
        id="template-paraphrase",
    ),
    pytest.param([*DARRIEUX, "--target", "English", "--as", " "], "the submitter name is empty", id="empty-submitter"),
]


@pytest.mark.parametrize(("args", "message"), BAD_SUBMISSIONS)
def test_bad_submission_writes_nothing(metake, row_counts, args, message):
    one_line_error(metake("submit", *args), message)
    assert row_counts() == NOTHING


def test_usage_errors_are_one_line_and_write_nothing(metake, row_counts, tmp_path):
    one_line_error(metake("submit", "--prompt", PROMPT), "give --prompt, --subject and --target, or --file", 2)
    one_line_error(
        metake("submit", *DARRIEUX, "--target", "x", "--file", str(tmp_path / "f.jsonl")),
        "--file cannot be combined with --prompt/--subject/--target/--original/...",
        2,
    )
    one_line_error(
        metake("submit", "--prompt", "", "--file", str(tmp_path / "f.jsonl")),
        "--file cannot be combined with --prompt/--subject/--target/--original/...",
        2,
    )
    one_line_error(
        metake("submit", *DARRIEUX, "--target", "x", "--priority", "high"),
        "Invalid value for '--priority': 'high' is not a valid integer.",
        2,
    )
    assert row_counts() == NOTHING


def test_unknown_status_name(metake, row_counts):
    submit_ok(metake, *DARRIEUX, "--target", "English")
    before = row_counts()
    expected = (
        "Invalid value for '--status': 'pendng' is not one of 'pending', 'applying', 'applied', 'failed', "
        "'rejected', 'superseded', 'reverted', 'staged', 'abandoned'."
    )
    one_line_error(metake("queue", "--status", "pendng"), expected, 2)
    one_line_error(metake("history", "--status", "pendng"), expected, 2)
    assert row_counts() == before


def test_bad_time_is_rejected(metake):
    one_line_error(
        metake("history", "--since", "yesterday"),
        "Invalid value for '--since': 'yesterday' is not an ISO 8601 date or time "
        "(e.g. 2025-01-31 or 2025-01-31T14:00)",
        2,
    )


def test_unknown_id(metake, row_counts):
    one_line_error(metake("show", "42"), "no correction with id 42")
    one_line_error(metake("show", "42", "--json"), "no correction with id 42")
    assert row_counts() == NOTHING


def test_ids_beyond_a_database_integer_are_one_line(metake, row_counts):
    """2**64 used to reach SQLite and end in an OverflowError traceback."""
    too_big = str(2**64)
    limit = f"is not in the range 1<=x<={2**63 - 1}."
    one_line_error(metake("show", too_big), f"Invalid value for 'ID': {too_big} {limit}", 2)
    one_line_error(metake("revert", too_big), f"Invalid value for 'CHECKPOINT_ID': {too_big} {limit}", 2)
    assert row_counts() == NOTHING


def test_readers_are_not_held_up_by_a_writer(metake, engine):
    """SQLite: queue, history, show, checkpoints and audit verify answer while another connection
    holds the write lock (they used to wait 30 s for it and fail); PostgreSQL: they run READ ONLY."""
    new_id = submit_ok(metake, *DARRIEUX, "--target", "English")
    if engine.dialect.name == "postgresql":
        refused = pytest.raises(sqlalchemy.exc.InternalError, match="read-only transaction")
        with refused, read_only(engine).begin() as connection:
            connection.execute(sqlalchemy.text("UPDATE corrections SET priority = 1"))
        return
    writer = sqlite3.connect(engine.url.database, isolation_level=None, timeout=0)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE corrections SET priority = 7")
        began = time.monotonic()
        for args in (("queue",), ("history",), ("show", str(new_id)), ("checkpoints",), ("audit", "verify")):
            result = metake(*args)
            assert result.exit_code == 0, (args, result.output)
        assert time.monotonic() - began < 10  # not one busy timeout (30 s)
        assert json.loads(metake("queue", "--json").stdout)[0]["priority"] == 0  # the committed snapshot
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_writer_that_waits_too_long_for_the_lock_gets_one_line(metake, engine, db_url, monkeypatch):
    """SQLite's busy timeout and PostgreSQL's lock_timeout end the same way: one line, exit 1,
    naming the import it waited for when the lock's holder is one."""
    monkeypatch.setattr(storage.db, "SQLITE_BUSY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(storage.db, "LOCK_TIMEOUT_S", 0.3)
    holder = storage.db.make_engine(db_url)
    sessions = storage.db.session_factory(holder)
    for announced in (False, True):
        with sessions.begin() as session:  # holds the write lock / the audit chain's lock
            if holder.dialect.name == "postgresql":
                session.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK_KEY})
            else:
                session.execute(sqlalchemy.text("UPDATE corrections SET priority = 0 WHERE id < 0"))
            with announce_import(session, 20000, "alice") if announced else contextlib.nullcontext():
                result = metake("submit", *DARRIEUX, "--target", "English")
        waited_for = (
            r"an import of 20000 records by alice \(started [0-2] s ago\) is running"
            if announced
            else "another metake process holds its write lock"
        )
        assert result.exit_code == 1
        assert re.fullmatch(f"Error: the database is busy: {waited_for}; retry\n", result.stderr), result.stderr
    holder.dispose()
    assert not list(Path(engine.url.database or "/nonexistent").parent.glob("*.import-*.json"))  # notes removed


def test_unreadable_file(metake, row_counts, tmp_path):
    missing = tmp_path / "missing.jsonl"
    one_line_error(metake("submit", "--file", str(missing)), f"cannot read {missing}: No such file or directory")
    one_line_error(metake("submit", "--file", str(tmp_path)), f"cannot read {tmp_path}: Is a directory")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "{} is", "subject": "s", "target": "t"}\n\x80\x81\n')
    one_line_error(metake("submit", "--file", str(binary)), f"{binary} line 2: not UTF-8 text")
    assert row_counts() == NOTHING


def test_malformed_json_list_names_the_line(metake, row_counts, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "{} is", "subject": "s", "target": "t"},\n  {"prompt": "{} is",,}\n]\n')
    one_line_error(
        metake("submit", "--file", str(broken)),
        f"{broken}: line 3: malformed JSON: Expecting property name enclosed in double quotes (column 22)",
    )
    assert row_counts() == NOTHING


def test_file_with_invalid_records_lists_every_bad_line_and_imports_nothing(metake, row_counts, tmp_path):
    good = {"prompt": PROMPT, "subject": "Danielle Darrieux", "target": "English"}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "\n".join(
            [
                json.dumps(good),
                json.dumps(good | {"target": " "}),
                "{oops",
                json.dumps(good | {"subject": "Léon Blum"}),
                json.dumps(
                    {
                        "case_id": 1,
                        "prompt": "Kuala Langat, located in",
                        "subject": "Nobody",
                        "target_new": "x",
                    }
                ),
            ]
        )
    )
    result = metake("submit", "--file", str(mixed))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"Error: {mixed}: 3 invalid record(s), nothing imported (--skip-invalid imports the 2 valid one(s)):",
        "  line 2: the target is empty",
        "  line 3: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
        "  line 5: the subject 'Nobody' does not occur in the prompt 'Kuala Langat, located in'",
    ]
    assert row_counts() == NOTHING

    skipped = metake("submit", "--file", str(mixed), "--skip-invalid")
    assert skipped.exit_code == 0
    assert skipped.stdout == "1\n2\n"
    reasons = [
        "line 2: the target is empty",
        "line 3: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
        "line 5: the subject 'Nobody' does not occur in the prompt 'Kuala Langat, located in'",
    ]
    assert skipped.stderr.splitlines() == [
        *(f"skipped {mixed} {reason}" for reason in reasons),
        f"queued 2 correction(s) from {mixed}",
    ]
    assert row_counts()["corrections"] == 2


def test_unreachable_database_hides_the_password(tmp_path):
    url = "postgresql+psycopg://metake:s3cret-pw@127.0.0.1:1/metake"
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "--db", url, "queue"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot reach database postgresql+psycopg://metake:***@127.0.0.1:1/metake: ")
    assert len(result.stderr.splitlines()) == 1
    assert "s3cret-pw" not in result.output


def test_the_home_and_database_are_owner_only_unless_umask_says_otherwise(tmp_path):
    before = os.umask(0o022)
    try:
        private, shared = tmp_path / "private", tmp_path / "shared"
        assert CliRunner().invoke(main, ["--home", str(private), "init"]).exit_code == 0
        assert CliRunner().invoke(main, ["--home", str(shared), "--umask", "022", "init"]).exit_code == 0
        assert os.umask(0o022) == 0o022  # the command gave the process its mask back
    finally:
        os.umask(before)
    for home, folder, file in ((private, 0o700, 0o600), (shared, 0o755, 0o644)):
        assert {stat.S_IMODE(p.stat().st_mode) for p in home.iterdir() if p.is_dir()} | {
            stat.S_IMODE(home.stat().st_mode)
        } == {folder}
        assert stat.S_IMODE((home / "metake.sqlite3").stat().st_mode) == file


def test_a_home_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "home"
    blocker.write_text("a file, not a folder")
    result = CliRunner().invoke(main, ["--home", str(blocker), "init"])
    assert result.exit_code == 1
    assert result.stderr == f"Error: cannot create the data home folder {blocker}: File exists\n"


def test_a_damaged_sqlite_file_is_one_line(tmp_path):
    home = tmp_path / "home"
    run = lambda *args, **kw: CliRunner().invoke(main, ["--home", str(home), *args], **kw)  # noqa: E731
    assert run("init").exit_code == 0
    lines = "".join(
        json.dumps({"prompt": "The capital of {} is", "subject": f"Country {i}", "target": "Rome"}) + "\n"
        for i in range(40)
    )
    assert run("submit", "--file", "-", input=lines).exit_code == 0
    database = home / "metake.sqlite3"
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(database, "r+b") as handle:
        for page in (5, 7, 9, 11, 23, 25):  # indexes, the corrections and the audit events
            handle.seek(4096 * page + 8)
            handle.write(b"\x07" * 64)
    for args in (("queue",), ("audit", "verify")):  # a read that hits the damage; the full page check
        result = run(*args)
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: the database file is damaged (")
        assert result.stderr.endswith("); restore it from a backup\n") and result.stderr.count("\n") == 1


def test_a_port_that_is_not_a_number_is_one_line(tmp_path):
    url = "postgresql+psycopg://metake:s3cret-pw@localhost:abc/metake"
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "--db", url, "queue"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["Error: not a database URL: <unparseable database URL>"]


def test_environment_selects_home_and_database(monkeypatch, tmp_path, db_url):
    monkeypatch.setenv("METAKE_DB_URL", db_url)
    monkeypatch.setenv("METAKE_HOME", str(tmp_path / "env-home"))
    result = CliRunner().invoke(main, ["submit", *DARRIEUX, "--target", "English", "--as", "env"])
    assert (result.exit_code, result.stdout) == (0, "1\n")
    explicit = CliRunner().invoke(main, ["--db", f"sqlite:///{tmp_path / 'none.sqlite3'}", "queue"])
    assert explicit.exit_code == 1 and "no database at" in explicit.stderr


def test_store_commands_do_not_load_torch_or_the_plotting_and_metrics_libraries(tmp_path):
    """`submit`, `queue`, `status` start in well under a second because they import none of these."""
    home = str(tmp_path / "home")
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cli import main\n"
        f"for args in (['init'], ['submit', '--prompt', '{{}} is', '--subject', 'a', '--target', 'b'], ['queue'],"
        " ['status']):\n"
        f"    assert CliRunner().invoke(main, ['--home', {home!r}, *args]).exit_code == 0, args\n"
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'prometheus_client') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=True)
    assert done.stdout == "[]\n"


def test_corrections_name_their_model_and_the_lists_filter_by_it(metake, monkeypatch):
    fact = ("--prompt", "The capital of {} is", "--subject", "France", "--target", "Rome")
    assert submit_ok(metake, *fact) == 1
    assert submit_ok(metake, *fact, "--model", "support-bot") == 2  # another model: supersedes nothing
    table = metake("queue").stdout.splitlines()
    assert table[0].split()[:3] == ["id", "model", "status"]
    assert [line.split()[:3] for line in table[1:]] == [["1", "default", "pending"], ["2", "support-bot", "pending"]]
    only = json.loads(metake("queue", "--model", "support-bot", "--json").stdout)
    assert [(c["id"], c["model"]) for c in only] == [(2, "support-bot")]
    assert [c["id"] for c in json.loads(metake("history", "--model", "default", "--json").stdout)] == [1]
    status = json.loads(metake("status", "--model", "support-bot", "--json").stdout)
    assert status["queue"]["pending"] == 1
    bad = metake("submit", *fact, "--model", "../etc")
    assert bad.exit_code == 2 and "model name '../etc' must be 1-100 letters, digits" in bad.stderr
    assert len(json.loads(metake("history", "--json").stdout)) == 2  # nothing written
    monkeypatch.setenv("METAKE_MODEL_NAME", "env-bot")  # a shell's (or a service's) default model
    assert submit_ok(metake, *fact) == 3
    assert json.loads(metake("history", "--model", "env-bot", "--json").stdout)[0]["id"] == 3


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[None]:
    """``folder`` (already filled) made unwritable: a read-only tmpfs over it as root, mode 0555 otherwise."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    saved = folder.with_name(folder.name + "-files")
    folder.rename(saved)
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only file system here: {mounted.stderr.decode().strip()}")
    try:
        for path in saved.iterdir():
            if path.is_file():
                shutil.copy2(path, folder / path.name)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def test_an_archived_home_on_a_read_only_file_system_can_be_read_and_verified(tmp_path):
    home = tmp_path / "home"
    run = lambda *args, **kw: CliRunner().invoke(main, ["--home", str(home), *args], **kw)  # noqa: E731
    assert run("init").exit_code == 0
    fact = ("--prompt", "The capital of {} is", "--subject", "France", "--target", "Rome")
    assert run("submit", *fact).exit_code == 0
    for leftover in home.iterdir():  # only the database: a clean shutdown leaves no -wal or -shm
        if leftover.is_dir() or leftover.name.endswith(("-wal", "-shm")):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    with read_only_folder(home):
        assert json.loads(run("queue", "--json").stdout)[0]["subject"] == "France"
        verified = run("audit", "verify")
        assert verified.exit_code == 0 and verified.stdout.startswith("audit chain verified: 1 events")
        assert run("status", "--json").exit_code == 0 and run("history").exit_code == 0
        refused = run("submit", *fact)
        assert refused.exit_code == 1
        assert refused.stderr == (
            "Error: the database is read-only here (its folder cannot be written): only commands that read work\n"
        )


def test_an_unmerged_write_ahead_log_on_a_read_only_file_system_is_refused(tmp_path):
    home = tmp_path / "home"
    run = lambda *args: CliRunner().invoke(main, ["--home", str(home), *args])  # noqa: E731
    assert run("init").exit_code == 0
    database = home / "metake.sqlite3"
    keep_open = sqlite3.connect(database)  # holds the log open, so its writes stay in it
    keep_open.execute("PRAGMA wal_autocheckpoint = 0")
    keep_open.execute("CREATE TABLE scratch (x)")
    keep_open.commit()
    try:
        assert (home / "metake.sqlite3-wal").stat().st_size > 0
        with read_only_folder(home):
            result = run("queue")
    finally:
        keep_open.close()
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "holds writes not yet merged into it; open a writable copy of the home instead" in result.stderr


def test_a_file_import_announces_itself_while_it_runs(metake, monkeypatch, tmp_path):
    """Every transaction of an import (one, or one per chunk) says what it is to whoever waits."""
    seen = []
    real = storage.imports.announce_import

    @contextlib.contextmanager
    def spy(session, records, submitter, started=None):
        with real(session, records, submitter, started):
            seen.append((records, submitter, running_import(session.get_bind())))
            yield

    monkeypatch.setattr(storage.imports, "announce_import", spy)
    records = [{"prompt": PROMPT, "subject": f"Person {i}", "target": "English"} for i in range(3)]
    lines = "".join(json.dumps(record) + "\n" for record in records)
    path = tmp_path / "three.jsonl"
    path.write_text(lines)
    assert metake("submit", "--file", str(path), "--as", "bob").exit_code == 0
    assert metake("submit", *DARRIEUX, "--target", "English").exit_code == 0  # one correction: no announcement
    assert [(records, who) for records, who, _ in seen] == [(3, "bob")]
    assert seen[0][2].startswith("an import of 3 records by bob (started ")  # what a waiting command reads
    monkeypatch.setattr(storage.imports, "IMPORT_CHUNK", 2)
    assert metake("submit", "--file", str(path), "--as", "carol").exit_code == 0
    assert [(records, who) for records, who, _ in seen[1:]] == [(3, "carol"), (3, "carol")]  # two chunks


def counts_by_status(engine) -> dict[str, int]:
    with engine.connect() as connection:
        query = "SELECT status, count(*) FROM corrections GROUP BY status"
        return dict(connection.execute(sqlalchemy.text(query)).all())


def test_an_import_killed_midway_queues_nothing_and_is_abandoned_by_the_next(metake, db_url, engine, tmp_path):
    """kill -9 between two committed chunks: nothing pending, the next import abandons what was
    staged, and the rows and chain verify throughout."""
    records = [{"prompt": PROMPT, "subject": f"Person {i}", "target": "English"} for i in range(40000)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable,
        "-m",
        "cli",
        "--home",
        str(tmp_path / "home"),
        "--db",
        db_url,
        "submit",
        "--file",
        str(path),
    ]
    importer = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = "SELECT count(*) FROM corrections WHERE status = 'staged'"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and importer.poll() is None:
            with engine.connect() as connection:
                if connection.execute(sqlalchemy.text(staged)).scalar():
                    break
            time.sleep(0.02)
        importer.kill()
    finally:
        importer.wait()
    statuses = counts_by_status(engine)
    assert set(statuses) == {"staged"} and 0 < statuses["staged"] < 40000  # killed midway, nothing queued
    assert metake("audit", "verify").exit_code == 0
    assert json.loads(metake("queue", "--json").stdout) == []
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps(records[0] | {"target": "French"}) + "\n")
    assert metake("submit", "--file", str(small)).exit_code == 0
    after = counts_by_status(engine)
    assert after == {"abandoned": statuses["staged"], "pending": 1}
    verified = metake("audit", "verify")
    assert verified.exit_code == 0, verified.output
