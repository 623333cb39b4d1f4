"""Property tests of intake: any text either becomes exactly the corrections it describes, or is
refused with one line per bad record; nothing else (no traceback, no record lost or invented)."""

from __future__ import annotations

import json
import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.errors import InvalidInput
from storage.intake import parse_corrections_text

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

field_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",))
    | st.sampled_from(" {}\u200b\u202e\t\n\u00e9e\u0301"),
    max_size=30,
)
records = st.fixed_dictionaries(
    {"prompt": field_text.map(lambda t: t + " {} is"), "subject": field_text, "target": field_text},
    optional={"priority": st.integers(min_value=-(10**12), max_value=10**12), "original_answer": field_text},
)


@FAST
@given(st.text(max_size=200))
def test_any_text_is_parsed_or_refused_in_one_line(text):
    try:
        parsed = parse_corrections_text(text)
    except InvalidInput as error:
        assert "\n" not in str(error)
        return
    for error in parsed.errors:
        assert "\n" not in error.reason and error.line >= 1


@FAST
@given(st.lists(records, min_size=1, max_size=8))
def test_each_record_is_kept_exactly_or_refused_with_its_line(batch):
    text = "".join(json.dumps(record) + "\n" for record in batch)
    parsed = parse_corrections_text(text)
    kept = dict(parsed.corrections)
    refused = {error.line: error.reason for error in parsed.errors}
    assert set(kept) | set(refused) == set(range(1, len(batch) + 1))
    assert not set(kept) & set(refused)
    for line, record in enumerate(batch, 1):
        if line in refused:
            assert "\n" not in refused[line]
            continue
        correction = kept[line]
        normal = lambda value: unicodedata.normalize("NFC", value.strip())  # noqa: E731
        assert correction.prompt == normal(record["prompt"])
        assert (correction.subject, correction.target) == (normal(record["subject"]), normal(record["target"]))
        assert correction.priority == record.get("priority", 0)
        if "original_answer" in record:
            assert correction.original_answer == normal(record["original_answer"])
