"""`metake report`: one self-contained HTML page about a model's life, drawn from the database alone.

The figures are matplotlib PNGs inlined as data URIs, so the file opens anywhere without network
or the data home, and prints. Each figure says what it shows and is left out, with a line saying
so, when there is nothing to draw yet.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

import matplotlib

matplotlib.use("Agg")  # files only: no display, whatever the environment says

import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from storage.report_data import LATEST, ReportData  # noqa: E402
from storage.serialize import iso  # noqa: E402

STATUS_COLOURS = {
    "pending": "#9e9e9e",
    "applying": "#42a5f5",
    "applied": "#2e7d32",
    "failed": "#c62828",
    "rejected": "#ef6c00",
    "superseded": "#8d6e63",
    "reverted": "#6a1b9a",
}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
img { max-width: 100%; } p.note { color: #666; }
table { border-collapse: collapse; font-size: 0.85rem; width: 100%; }
td, th { border-bottom: 1px solid #eee; padding: 0.2rem 0.4rem; text-align: left; }
code { font-size: 0.85rem; }
@media print { h2 { page-break-after: avoid; } img { page-break-inside: avoid; } }
"""


def render_report(data: ReportData, title: str, generated: datetime) -> str:
    """The whole page as a string."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>Generated {iso(generated)} from the database"
        + (f"; corrections submitted since {iso(data.since)}" if data.since else "")
        + f". {len(data.corrections)} corrections, {len(data.checkpoints)} checkpoints.</p>",
    ]
    if not data.corrections and not data.checkpoints:
        parts.append("<p>Nothing to report yet: no correction has been submitted and no checkpoint written.</p>")
    else:
        for heading, draw, empty in SECTIONS:
            parts.append(f"<h2>{heading}</h2>")
            figure = draw(data)
            parts.append(_image(figure, heading) if figure is not None else f"<p class='note'>{empty}</p>")
        parts.append(f"<h2>Latest corrections</h2>{_latest_table(data)}")
    parts.append("</body></html>")
    return "\n".join(parts)


def _image(figure: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


def _figure(rows: int = 1) -> tuple[Figure, list]:
    figure, axes = plt.subplots(rows, 1, figsize=(9, 3.2 * rows), squeeze=False)
    return figure, [a[0] for a in axes]


def _time_axis(axis: plt.Axes, times: list[datetime]) -> None:
    """Dates that read well at any range; an hour either side of a lone instant (not four years)."""
    locator = mdates.AutoDateLocator()
    axis.xaxis.set_major_locator(locator)
    axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if times and min(times) == max(times):
        axis.set_xlim(min(times) - timedelta(hours=1), max(times) + timedelta(hours=1))


def corrections_over_time(data: ReportData) -> Figure | None:
    if not data.corrections:
        return None
    figure, (timeline, counts) = _figure(2)
    submitted = sorted(c["submitted_at"] for c in data.corrections)
    timeline.step(submitted, range(1, len(submitted) + 1), where="post", label="submitted")
    applied = sorted(c["applied_at"] for c in data.corrections if c["applied_at"] and c["status"] == "applied")
    if applied:
        timeline.step(applied, range(1, len(applied) + 1), where="post", label="applied (still)")
    timeline.set_ylabel("corrections (cumulative)")
    timeline.legend(loc="upper left")
    by_status = Counter(c["status"] for c in data.corrections)
    names = [s for s in STATUS_COLOURS if by_status.get(s)]
    counts.barh(names, [by_status[s] for s in names], color=[STATUS_COLOURS[s] for s in names])
    counts.set_xlabel("corrections by status now")
    _time_axis(timeline, submitted + applied)
    figure.tight_layout()
    return figure


def probabilities_before_after(data: ReportData) -> Figure | None:
    pairs = [(p["target_prob.pre"], p["target_prob.post"]) for p in data.probabilities.values() if _has(p, "target")]
    if not pairs:
        return None
    figure, (axis,) = _figure()
    axis.scatter([a for a, _ in pairs], [b for _, b in pairs], s=12, label="P(new target)", color="#2e7d32")
    original = [
        (p["original_prob.pre"], p["original_prob.post"]) for p in data.probabilities.values() if _has(p, "original")
    ]
    if original:
        axis.scatter([a for a, _ in original], [b for _, b in original], s=12, label="P(old answer)", color="#c62828")
    axis.plot([0, 1], [0, 1], color="#999", linewidth=0.8)
    axis.set_xlabel("before the edit")
    axis.set_ylabel("after the edit")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.legend(loc="center right")
    return figure


def _has(p: dict[str, float], which: str) -> bool:
    return f"{which}_prob.pre" in p and f"{which}_prob.post" in p


def health_over_time(data: ReportData) -> Figure | None:
    points = [h for h in data.health if h.get("retention") is not None or h.get("perplexity_ratio") is not None]
    if not points:
        return None
    figure, (retention, drift) = _figure(2)
    kept = [h for h in points if h.get("retention") is not None]
    retention.plot([h["at"] for h in kept], [h["retention"] for h in kept], marker="o", color="#2e7d32")
    retention.set_ylabel("retention of earlier corrections")
    retention.set_ylim(0, 1.05)
    ratio = [h for h in points if h.get("perplexity_ratio") is not None]
    drift.plot([h["at"] for h in ratio], [(h["perplexity_ratio"] - 1) * 100 for h in ratio], marker="o")
    drift.set_ylabel("perplexity drift (%)")
    for axis in (retention, drift):
        _time_axis(axis, [h["at"] for h in points])
    figure.tight_layout()
    return figure


def weight_change_over_time(data: ReportData) -> Figure | None:
    if not data.weight_change:
        return None
    figure, (axis,) = _figure()
    layers = sorted({layer for _, layer, _ in data.weight_change}, key=lambda name: int(name.removeprefix("layer")))
    for layer in layers:
        points = sorted((at, value) for at, name, value in data.weight_change if name == layer)
        axis.plot([a for a, _ in points], [v for _, v in points], marker=".", label=layer)
    axis.set_ylabel("||dW|| / ||W|| per edit")
    axis.legend(loc="upper left", ncol=min(len(layers), 6))
    _time_axis(axis, [at for at, _, _ in data.weight_change])
    return figure


def realised_gain(data: ReportData) -> Figure | None:
    if not data.realised_gain:
        return None
    figure, (axis,) = _figure()
    axis.hist(data.realised_gain, bins=30, range=(0, 1), color="#42a5f5")
    axis.set_xlabel("realised gain (share of the planned change the constraints let through)")
    axis.set_ylabel("corrections")
    return figure


def checkpoint_chain(data: ReportData) -> Figure | None:
    if not data.checkpoints:
        return None
    figure, (axis,) = _figure()
    by_id = {c["id"]: c for c in data.checkpoints}
    links = [(by_id[c["parent"]], c) for c in data.checkpoints if c["parent"] in by_id]
    # One collection for every link: thousands of separate lines take seconds to draw.
    at = mdates.date2num
    axis.add_collection(
        LineCollection(
            [[(at(p["created_at"]), p["id"]), (at(c["created_at"]), c["id"])] for p, c in links],
            colors=["#6a1b9a" if c["kind"] == "revert" else "#999" for _, c in links],
            linewidths=1,
        )
    )
    colours = ["#6a1b9a" if c["kind"] == "revert" else ("#bbb" if c["pruned"] else "#2e7d32") for c in data.checkpoints]
    axis.scatter([c["created_at"] for c in data.checkpoints], [c["id"] for c in data.checkpoints], c=colours, s=14)
    axis.set_ylabel("checkpoint id")
    axis.set_title("green: kept, grey: pruned file, purple: a revert and its link to the restored state", fontsize=9)
    _time_axis(axis, [c["created_at"] for c in data.checkpoints])
    return figure


SECTIONS: tuple[tuple[str, Callable[[ReportData], Figure | None], str], ...] = (
    ("Corrections over time", corrections_over_time, "No corrections yet."),
    ("Probability of the answer, before and after each edit", probabilities_before_after, "No edit scored yet."),
    ("Health checks: retention and perplexity drift", health_over_time, "No health check yet."),
    ("Weight change per edited layer", weight_change_over_time, "No edit yet."),
    ("Realised gain", realised_gain, "No edit yet."),
    ("Checkpoint chain", checkpoint_chain, "No checkpoint yet."),
)


def _latest_table(data: ReportData) -> str:
    latest = data.corrections[-LATEST:][::-1]
    if not latest:
        return "<p class='note'>No corrections yet.</p>"
    several = len({c["model"] for c in data.corrections}) > 1
    rows = []
    for c in latest:
        p = data.probabilities.get(c["id"], {})
        before, after = p.get("target_prob.pre"), p.get("target_prob.post")
        change = f"{before:.2f} &rarr; {after:.2f}" if before is not None and after is not None else ""
        cells = [
            str(c["id"]),
            *([html.escape(c["model"])] if several else []),
            html.escape(c["status"]),
            html.escape(c["subject"]),
            html.escape(c["target"]),
            change,
            html.escape(iso(c["submitted_at"]) or ""),
            f"<code>metake show {c['id']}</code>",
        ]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    headers = ("id", *(("model",) if several else ()), "status", "subject", "target", "P(target)", "submitted", "story")
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"
