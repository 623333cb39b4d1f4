"""Draw lifelong runs that live in different curve files on the same axes, relabelled by setting
(runs share method names): ``.venv/bin/python benchmarks/plot_runs.py`` writes
docs/lifelong/tune200/*.png (the 200-edit validation runs), docs/lifelong/heldout/*.png (the
spread against AlphaEdit and the tuned MetaKE on held-out train records) and docs/lifelong/full/*.png
(the 2,000-edit run, one curve file a method) and docs/lifelong/cap/*.png (the spectral cap from
the first correction against the uncapped runs), docs/lifelong/passes/*.png (capped MetaKE with
and without max_passes 3 on the same stream) and docs/lifelong/rehearsal/*.png (capped MetaKE with
and without rehearsal every 100 edits), as docs/lifelong.md shows them."""

from pathlib import Path

from evaluation.lifelong import draw_curves, read_curves

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = RESULTS.parents[1] / "docs" / "lifelong"
COMMITTED = ("perplexity", "max_norm_growth", "window_gen_efficacy", "retention_first")
# The 2,000-edit run's figures add what explains its bends: the realised gain, the planned change,
# the subjects' outputs, the constraint's conditioning and the neighbourhood.
FULL = COMMITTED + ("median_gain", "median_plan_norm", "median_subject_norm", "log10_condition", "specificity")
# figure set -> (curve file, method in it, label on the plot)
FIGURES = {
    "tune200": (
        ("lifelong-tune-val100-spread.jsonl", "metake", "metake, spread (0.04)"),
        ("lifelong-tune-val100-null04.jsonl", "metake", "metake (0.04)"),
        ("lifelong-tune-val100-null02.jsonl", "alphaedit", "alphaedit (0.02)"),
        ("lifelong-tune-val100-null02.jsonl", "unedited", "unedited"),
    ),
    "heldout": (
        ("lifelong-train2000-spread.jsonl", "metake", "metake, spread (0.04)"),
        ("lifelong-train2000.jsonl", "metake", "metake (tuned file, 0.02)"),
        ("lifelong-train2000-spread.jsonl", "alphaedit", "alphaedit (0.02)"),
        ("lifelong-train2000-spread.jsonl", "unedited", "unedited"),
    ),
    "full": (
        ("lifelong-train2000-full-metake.jsonl", "metake", "metake, spread (0.04)"),
        ("lifelong-train2000-full-alphaedit.jsonl", "alphaedit", "alphaedit (0.02)"),
        ("lifelong-train2000-full-memit.jsonl", "memit", "memit (lambda 500)"),
        ("lifelong-train2000-full-metake.jsonl", "unedited", "unedited"),
    ),
    "cap": (
        ("lifelong-train2000-cap-metake.jsonl", "metake", "metake, cap 0.5"),
        ("lifelong-train2000-full-metake.jsonl", "metake", "metake, uncapped"),
        ("lifelong-train2000-cap-alphaedit.jsonl", "alphaedit", "alphaedit, cap 0.75"),
        ("lifelong-train2000-full-alphaedit.jsonl", "alphaedit", "alphaedit, uncapped"),
        ("lifelong-train2000-cap-memit.jsonl", "memit", "memit, cap 0.5"),
        ("lifelong-train2000-full-memit.jsonl", "memit", "memit, uncapped"),
        ("lifelong-train2000-cap-metake.jsonl", "unedited", "unedited"),
    ),
    "passes": (
        ("lifelong-train2000-cap-metake-passes3.jsonl", "metake", "metake, cap 0.5, max_passes 3"),
        ("lifelong-train2000-cap-metake-says.jsonl", "metake", "metake, cap 0.5"),
        ("lifelong-train2000-cap-metake-passes3.jsonl", "unedited", "unedited"),
    ),
    "rehearsal": (
        ("lifelong-train2000-cap-metake-rehearse.jsonl", "metake", "metake, cap 0.5, rehearsal every 100"),
        ("lifelong-train2000-cap-metake-says.jsonl", "metake", "metake, cap 0.5"),
        ("lifelong-train2000-cap-metake-passes3.jsonl", "metake", "metake, cap 0.5, max_passes 3"),
        ("lifelong-train2000-cap-metake-rehearse.jsonl", "unedited", "unedited"),
    ),
}
# The capped runs also measure the neighbourhood's shift and fluency at every point.
QUANTITIES = {
    "full": FULL,
    "cap": COMMITTED + ("specificity", "neighbour_shift", "fluency", "retention"),
    # what max_passes is for: said corrections, now and later, and what it costs
    "passes": COMMITTED + ("retention", "retention_says", "retention_first_says", "said_at_edit", "specificity"),
    # what rehearsal repairs, what it spends, and what that costs the rest of the model
    "rehearsal": COMMITTED
    + ("retention", "retention_says", "retention_first_says", "rehearsal_unsaid", "neighbour_shift", "specificity"),
}


def relabelled(runs: tuple[tuple[str, str, str], ...]) -> list[dict]:
    """The chosen method's points of each file, their method renamed to the label."""
    points = []
    for name, method, label in runs:
        points += [p | {"method": label} for p in read_curves(RESULTS / name) if p["method"] == method]
    return points


if __name__ == "__main__":
    for figure_set, runs in FIGURES.items():
        out = DOCS / figure_set
        out.mkdir(parents=True, exist_ok=True)
        draw_curves(relabelled(runs), out, QUANTITIES.get(figure_set, COMMITTED))
