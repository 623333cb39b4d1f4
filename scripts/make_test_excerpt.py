"""Regenerate the data committed under tests/data from ../shared/data (benchmark data, not in git).

- ``counterfact-excerpt.json``: the first ``--n`` records of CounterFact's train split (EasyEdit
  format, records copied unchanged and in order) that the unedited default model (SmolLM2-135M,
  float32 on the CPU) gets wrong: the new answer is less likely than the true one after the
  rewrite prompt, which is how the real-model tests choose records to edit.
- ``wikitext-2-raw-test-head.raw``: the first lines of WikiText-2's raw test split, up to the
  line at which the model's tokenizer reaches ``--tokens`` tokens when the statistics code
  (engine/stats.py) reads it paragraph by paragraph. Statistics of ``--tokens`` tokens from this
  file equal those from the whole file.

Usage: ``.venv/bin/python scripts/make_test_excerpt.py [--shared ../shared/data] [--n 40]
[--tokens 20000]``. Converts the default model into a temporary folder (~20 s) unless
``--cache DIR`` holds it already. Update tests/data/SOURCES.md if the sources change.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data"
COUNTERFACT = Path("counterfact") / "easyedit_counterfact-train.json"
WIKITEXT = Path("corpus") / "wikitext-2-raw_wiki.test.raw"


def wrong_before(loaded, path: Path, n: int) -> list[tuple[dict, float]]:  # noqa: ANN001 - a LoadedModel
    """The first ``n`` records whose new answer the model finds less likely than the true one, with the margin."""
    from evaluation.counterfact import load_counterfact
    from evaluation.metrics import score_records

    raw = {int(r["case_id"]): r for r in json.loads(path.read_text())}
    records = load_counterfact(path)
    chosen: list[tuple[dict, float]] = []
    for start in range(0, len(records), 40):
        chunk = records[start : start + 40]
        for record, score in zip(chunk, score_records(loaded.model, loaded.tokenizer, chunk), strict=True):
            new, true = score.rewrite
            if new < true:
                chosen.append((raw[record.case_id], true - new))
                if len(chosen) == n:
                    return chosen
    raise SystemExit(f"only {len(chosen)} of {len(records)} records are wrong before the edit; asked for {n}")


def text_head(tokenizer, text: str, n_tokens: int) -> str:  # noqa: ANN001 - a Hugging Face tokenizer
    """The lines of ``text`` that engine/stats.py reads to collect ``n_tokens`` tokens."""
    lines = text.split("\n")
    count = 0
    for i, paragraph in enumerate(lines):
        if paragraph.strip():
            count += len(tokenizer(paragraph.strip() + "\n", add_special_tokens=False).input_ids)
        if count >= n_tokens:
            return "\n".join(lines[: i + 1]) + "\n"
    raise SystemExit(f"the text has only {count} tokens; asked for {n_tokens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--n", type=int, default=40, help="CounterFact records to keep")
    parser.add_argument("--tokens", type=int, default=20000, help="tokens of WikiText to keep")
    parser.add_argument("--cache", type=Path, default=None, help="model cache (a temporary folder if not given)")
    args = parser.parse_args()

    from engine.models import load_model

    with tempfile.TemporaryDirectory() as scratch:
        loaded = load_model("default", cache_dir=args.cache or Path(scratch), device="cpu")
        chosen = wrong_before(loaded, args.shared / COUNTERFACT, args.n)
        head = text_head(loaded.tokenizer, (args.shared / WIKITEXT).read_text(errors="replace"), args.tokens)

    OUT.mkdir(exist_ok=True)
    excerpt = OUT / "counterfact-excerpt.json"
    excerpt.write_text(json.dumps([record for record, _ in chosen], indent=2, ensure_ascii=False) + "\n")
    print(f"{excerpt.relative_to(ROOT)}: {len(chosen)} records, case_id {chosen[0][0]['case_id']}..")
    print(f"  {chosen[-1][0]['case_id']}; margins log p(true) - log p(new): {[round(m, 2) for _, m in chosen]}")
    text = OUT / "wikitext-2-raw-test-head.raw"
    text.write_text(head)
    print(f"{text.relative_to(ROOT)}: {head.count(chr(10))} lines, {len(head.encode())} bytes, {args.tokens} tokens")


if __name__ == "__main__":
    main()
