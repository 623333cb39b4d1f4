"""`metake report`: a self-contained page with every figure once there is something to draw."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from storage.audit import append_event
from storage.checkpoints import audit_checkpoint
from storage.intake import make_correction
from storage.models import Checkpoint, Edit, Metric, Phase
from storage.queue import claim_batch, mark_applied, submit_many


def _life(sessions, edits: int = 6) -> None:
    """A model's short life: edits with scores and weight changes, health checks, a revert."""
    start = datetime.now(UTC) - timedelta(hours=edits)
    with sessions.begin() as session:
        submit_many(
            session,
            [
                make_correction("The capital of {} is", f"Country {i}", "Rome", original_answer="Paris")
                for i in range(edits + 2)
            ],
            "alice",
        )
        parent = Checkpoint(path="m/0.safetensors", sha256="0" * 64, size_bytes=10, base_model="m")
        parent.manifest, parent.created_at = {"kind": "base"}, start
        session.add(parent)
        session.flush()
        audit_checkpoint(session, parent, "d")
    for i in range(edits):
        at = start + timedelta(hours=i + 1)
        with sessions.begin() as session:
            (correction,) = claim_batch(session, 1, "d")
            kind = "revert" if i == edits - 1 else "edit"
            checkpoint = Checkpoint(
                path=f"m/{i + 1}.safetensors", sha256=f"{i + 1:064x}", size_bytes=10, base_model="m"
            )
            checkpoint.manifest, checkpoint.created_at, checkpoint.parent_id = {"kind": kind}, at, parent.id
            session.add(checkpoint)
            session.flush()
            edit = Edit(method="metake", model="m", layers=[4, 5], finished_at=at, checkpoint_after_id=checkpoint.id)
            session.add(edit)
            session.flush()
            values = [
                (correction.id, "target_prob", Phase.PRE, 0.01 * i),
                (correction.id, "target_prob", Phase.POST, 0.9),
                (correction.id, "original_prob", Phase.PRE, 0.8),
                (correction.id, "original_prob", Phase.POST, 0.05),
                (correction.id, "realised_gain", Phase.POST, 0.6),
                (None, "relative_weight_change.layer4", Phase.POST, 0.01 * (i + 1)),
                (None, "relative_weight_change.layer5", Phase.POST, 0.02 * (i + 1)),
            ]
            session.add_all(Metric(edit_id=edit.id, correction_id=c, name=n, phase=p, value=v) for c, n, p, v in values)
            mark_applied(session, [correction], edit.id, worker="d")
            audit_checkpoint(session, checkpoint, "d", edit_id=edit.id)
            payload = {"retention": 1 - 0.05 * i, "tested": 5, "perplexity_ratio": 1 + 0.01 * i}
            append_event(session, "health_checked", actor="d", edit_id=edit.id, payload=payload)
            parent = checkpoint


def test_report_draws_every_figure_and_lists_the_latest_corrections(metake, sessions, tmp_path):
    _life(sessions)
    out = tmp_path / "report.html"
    result = metake("report", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, 8 corrections)\n"
    page = out.read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 6
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from a network
    assert "<td>Country 7</td>" in page and "<code>metake show 1</code>" in page
    assert "0.05 &rarr; 0.90" in page  # correction 6's P(target) before and after
    since = metake(
        "report", "--out", str(tmp_path / "later.html"), "--since", (datetime.now(UTC) + timedelta(days=1)).isoformat()
    )
    assert since.stdout.endswith("0 corrections)\n")


def test_report_on_a_fresh_home_says_there_is_nothing_yet(metake, tmp_path):
    out = tmp_path / "empty.html"
    assert metake("report", "--out", str(out)).exit_code == 0
    assert "Nothing to report yet" in out.read_text()


def _browser() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome")
    return next((found for name in names if (found := shutil.which(name))), None)


def headless(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium without a display; --no-sandbox because tests may run as root (CI does)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(_browser() is None, reason="no Chromium on this machine (.ci/run installs the Debian package)")
def test_a_real_browser_renders_the_report_with_its_figures(metake, sessions, tmp_path):
    from PIL import Image

    _life(sessions)
    out = tmp_path / "report.html"
    assert metake("report", "--out", str(out)).exit_code == 0
    browser = _browser()
    assert browser is not None
    dom = headless(browser, "--dump-dom", out.as_uri()).stdout
    assert dom.count("<img") == 6 and "<td>Country 7</td>" in dom and "0.05 → 0.90" in dom
    shot = tmp_path / "report.png"
    headless(browser, f"--screenshot={shot}", "--window-size=1200,4000", out.as_uri())
    pixels = Image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20) or []
    # The figures were decoded and drawn: matplotlib's first line colour (#1f77b4) and hundreds of
    # anti-aliased shades appear; a page whose images failed to load is text on white.
    near_blue = sum(n for n, (r, g, b) in colours if abs(r - 0x1F) < 24 and abs(g - 0x77) < 24 and abs(b - 0xB4) < 24)
    assert len(colours) > 500 and near_blue > 500, (len(colours), near_blue)


def test_a_report_of_several_models_names_them_and_filters_by_one(metake, sessions, tmp_path):
    _life(sessions, edits=2)
    with sessions.begin() as session:
        submit_many(session, [make_correction("The capital of {} is", "Peru", "Rome")], "bob", model="other-bot")
    both, one = tmp_path / "both.html", tmp_path / "one.html"
    assert metake("report", "--out", str(both)).stdout.endswith(", 5 corrections)\n")
    page = both.read_text()
    assert "<th>model</th>" in page and "<td>other-bot</td>" in page and "<td>default</td>" in page
    assert metake("report", "--out", str(one), "--model", "other-bot").stdout.endswith(", 1 corrections)\n")
    only = one.read_text()
    assert "<td>Peru</td>" in only and "Country 0" not in only and "<th>model</th>" not in only
    assert only.count("data:image/png") == 1  # its corrections only: the edits, checks and checkpoints are default's
    status = json.loads(metake("status", "--model", "other-bot", "--json").stdout)
    assert status["last_health"] is None and status["last_applied"] is None
    assert json.loads(metake("status", "--model", "default", "--json").stdout)["last_health"] is not None
