"""Draw the 200-edit validation runs of docs/lifelong.md on the same axes (three runs that share
method names, relabelled by setting): ``.venv/bin/python benchmarks/plot_tune200.py`` writes
docs/lifelong/tune200/*.png (perplexity, largest weight change, retention of the first 100 and
generation-based efficacy are the ones committed)."""

import json
from pathlib import Path

from evaluation.lifelong import draw_curves

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = (
    ("spread", "metake", "metake, spread (0.04)"),
    ("null04", "metake", "metake (0.04)"),
    ("null02", "alphaedit", "alphaedit (0.02)"),
    ("null02", "unedited", "unedited"),
)

points = []
for name, method, label in RUNS:
    for line in (RESULTS / f"lifelong-tune-val100-{name}.jsonl").read_text().splitlines():
        point = json.loads(line)
        if point["method"] == method:
            points.append(point | {"method": label})
out = RESULTS.parents[1] / "docs" / "lifelong" / "tune200"
out.mkdir(parents=True, exist_ok=True)
draw_curves(points, out)
