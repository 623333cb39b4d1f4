"""Print a Markdown table of lifelong curve files at chosen points, as docs/lifelong.md shows them:
``.venv/bin/python benchmarks/lifelong_table.py benchmarks/results/lifelong-train2000-*.jsonl --at 500,1000,2000``
(files are read in order; the unedited reference is the first file's). ``FILE=LABEL`` renames the
file's methods to LABEL, for runs of one method under different settings."""

import argparse
from pathlib import Path

from evaluation.lifelong import UNEDITED, points_table, read_curves


def labelled(argument: str) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE=LABEL``."""
    name, _, label = argument.partition("=")
    return Path(name), label or None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=labelled, metavar="FILE[=LABEL]")
    parser.add_argument("--at", required=True, help="Comma-separated edit counts.")
    args = parser.parse_args()
    points = []
    for i, (path, label) in enumerate(args.files):
        mine = [p if label is None or p["method"] == UNEDITED else p | {"method": label} for p in read_curves(path)]
        points += [p for p in mine if i == 0 or p["method"] != UNEDITED]
    print(points_table(points, tuple(int(x) for x in args.at.split(","))))
