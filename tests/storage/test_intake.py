"""Validation of single corrections and parsing of correction files (no database involved)."""

from __future__ import annotations

import json

import pytest

from storage.errors import InvalidInput
from storage.intake import (
    CorrectionInput,
    Neighbor,
    correction_from_record,
    make_correction,
    parse_corrections_text,
    parse_neighbor_option,
    read_corrections_file,
)

DARRIEUX = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target": "English"}
COUNTERFACT_RECORD = {
    "case_id": 2,
    "prompt": "Toko Yasuda, the",
    "target_new": "piano",
    "subject": "Toko Yasuda",
    "ground_truth": "guitar",
    "rephrase_prompt": "Toko Yasuda is incredible at",
    "locality_prompt": "John Lennon performs on the",
    "locality_ground_truth": "guitar",
}


def test_valid_correction_is_normalised():
    correction = make_correction(
        "  The mother tongue of {} is ",
        " Danielle Darrieux",
        "English ",
        paraphrases=["Danielle Darrieux speaks"],
        neighbors=[{"prompt": "The mother tongue of Léon Blum is", "answer": "French"}],
        priority=5,
        original_answer="French",
    )
    assert correction == CorrectionInput(
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target="English",
        paraphrases=("Danielle Darrieux speaks",),
        neighbors=(Neighbor("The mother tongue of Léon Blum is", "French"),),
        priority=5,
        original_answer="French",
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "The mother tongue is"}, "the prompt has no '{}' where the subject goes"),
        (
            {"prompt": "The mother tongue of Danielle Darrieux is"},
            "the prompt has no '{}' where the subject goes; write '{}' in place of 'Danielle Darrieux'",
        ),
        ({"prompt": "{} and {} speak"}, "the prompt has 2 '{}' placeholders; exactly one is allowed"),
        ({"prompt": "x" * 1001 + "{}"}, "the prompt is 1003 characters long; the limit is 1000"),
        (
            {"prompt": "The mother\ttongue of {} is"},
            "the prompt contains a control character (U+0009) at character 11",
        ),
        ({"subject": "   "}, "the subject is empty"),
        (
            {"subject": "Danielle\x00Darrieux"},
            "the subject contains a control character (U+0000) at character 9",
        ),
        ({"target": ""}, "the target is empty"),
        ({"target": "   "}, "the target is empty"),
        ({"target": "E" * 201}, "the target is 201 characters long; the limit is 200"),
        ({"target": "Eng\nlish"}, "the target contains a control character (U+000A) at character 4"),
        ({"target": "Eng\u202elish"}, "the target contains a control character (U+202E) at character 4"),
        ({"target": 7}, "the target must be a string, not a number"),
        ({"target": "Eng\u200blish"}, "the target contains an invisible format character (U+200B) at character 4"),
        (
            {"subject": "Danielle\udcffDarrieux"},
            "the subject contains a lone surrogate (U+DCFF) at character 9, which is not Unicode text "
            "(undecodable input?)",
        ),
    ],
)
def test_bad_fields_are_rejected_with_a_reason(fields, message):
    record = DARRIEUX | fields
    with pytest.raises(InvalidInput) as caught:
        make_correction(record["prompt"], record["subject"], record["target"])
    assert str(caught.value) == message


def test_text_is_stored_in_one_unicode_form_and_joiners_are_kept():
    composed, decomposed = "Caf\u00e9", "Cafe\u0301"
    assert make_correction("{} is in", decomposed, "Paris").subject == composed
    assert make_correction("{} is", "s", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645").target.count("\u200c") == 1


def test_prompt_of_exactly_1000_characters_is_accepted():
    prompt = "x" * 998 + "{}"
    assert make_correction(prompt, "s", "t").prompt == prompt


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"paraphrases": "Danielle Darrieux speaks"},
            "the paraphrases must be a list of prompts, not a string",
        ),
        ({"paraphrases": ["{} speaks"]}, "the paraphrase 1 contains '{}'; write the subject out in full"),
        ({"paraphrases": ["ok", " "]}, "the paraphrase 2 is empty"),
        ({"neighbors": [["p", "a"]]}, "neighbor 1 must be an object with exactly the keys prompt and answer"),
        ({"neighbors": [{"prompt": "p", "answer": ""}]}, "the neighbor 1 answer is empty"),
        ({"priority": "high"}, "the priority must be an integer, not a string"),
        ({"priority": True}, "the priority must be an integer, not a boolean"),
        ({"priority": 10**7}, "the priority 10000000 is outside -1000000..1000000"),
        ({"original_answer": "  "}, "the original answer is empty"),
        (
            {"tagret": "x"},
            "unknown field 'tagret' (allowed: neighbors, original_answer, paraphrases, "
            "priority, prompt, subject, target)",
        ),
    ],
)
def test_bad_optional_fields_are_rejected(extra, message):
    with pytest.raises(InvalidInput) as caught:
        correction_from_record(DARRIEUX | extra)
    assert str(caught.value) == message


def test_paraphrases_may_span_lines_like_counterfact_ones():
    correction = correction_from_record(DARRIEUX | {"paraphrases": ["Once upon a time.\n Danielle Darrieux\tspeaks"]})
    assert correction.paraphrases == ("Once upon a time.\n Danielle Darrieux\tspeaks",)


def test_missing_field_is_named():
    with pytest.raises(InvalidInput, match="^missing field 'target'$"):
        correction_from_record({"prompt": "{} is", "subject": "s"})


def test_neighbor_option_splits_at_the_last_arrow():
    assert parse_neighbor_option("a=>b => c =>French") == Neighbor("a=>b => c", "French")
    with pytest.raises(InvalidInput, match=r"^--neighbor 'no arrow' is not of the form 'PROMPT=>ANSWER'$"):
        parse_neighbor_option("no arrow")


def test_counterfact_record_becomes_a_template_with_original_answer():
    correction = correction_from_record(COUNTERFACT_RECORD)
    assert correction == CorrectionInput(
        prompt="{}, the",
        subject="Toko Yasuda",
        target="piano",
        paraphrases=("Toko Yasuda is incredible at",),
        neighbors=(Neighbor("John Lennon performs on the", "guitar"),),
        original_answer="guitar",
        source="counterfact:2",
    )


def test_counterfact_subject_must_occur_in_prompt():
    with pytest.raises(InvalidInput) as caught:
        correction_from_record(COUNTERFACT_RECORD | {"subject": "Yoko Ono"})
    assert str(caught.value) == "the subject 'Yoko Ono' does not occur in the prompt 'Toko Yasuda, the'"


def test_json_lines_errors_carry_line_numbers():
    text = "\n".join(
        [
            json.dumps(DARRIEUX),
            "",
            json.dumps(DARRIEUX | {"target": " "}),
            "{not json",
            json.dumps([1, 2]),
            json.dumps(COUNTERFACT_RECORD),
        ]
    )
    parsed = parse_corrections_text(text)
    assert [line for line, _ in parsed.corrections] == [1, 6]
    assert [str(error) for error in parsed.errors] == [
        "line 3: the target is empty",
        "line 4: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
        "line 5: expected a JSON object, got a list",
    ]


def test_json_list_records_carry_their_starting_line():
    records = [DARRIEUX, DARRIEUX | {"prompt": "no placeholder"}, COUNTERFACT_RECORD]
    parsed = parse_corrections_text(json.dumps(records, indent=2))
    assert [line for line, _ in parsed.corrections] == [2, 12]
    assert [str(error) for error in parsed.errors] == ["line 7: the prompt has no '{}' where the subject goes"]


def test_single_pretty_printed_object_is_one_record():
    parsed = parse_corrections_text("\n" + json.dumps(DARRIEUX, indent=2))
    assert [line for line, _ in parsed.corrections] == [2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[\n{"prompt": "{}", \n"subject": "s",\n',
            "line 4: malformed JSON: Expecting property name enclosed",
        ),
        ("[\n  {}\n  {}\n]", "line 3: malformed JSON: expected ',' or ']' between list items"),
        ("[\n  {}", "line 2: malformed JSON: the list is not closed with ']'"),
        ("[]\n\n[]", "line 3: malformed JSON: extra data after the list"),
        ("  \n\n", "the file contains no records"),
        ("[]", "the file contains no records"),
    ],
)
def test_unreadable_text_raises_with_line(text, message):
    with pytest.raises(InvalidInput) as caught:
        parse_corrections_text(text)
    assert str(caught.value).startswith(message)


def test_unreadable_files(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(InvalidInput, match=f"^cannot read {missing}: No such file or directory$"):
        read_corrections_file(missing)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(json.dumps(DARRIEUX).encode() + b"\n\xff\xfe\n")
    with pytest.raises(InvalidInput, match=f"^{binary} line 2: not UTF-8 text$"):
        read_corrections_file(binary)


def test_the_counterfact_excerpt_parses_completely(test_data):
    excerpt = test_data / "counterfact-excerpt.json"
    parsed = read_corrections_file(excerpt)
    records = json.loads(excerpt.read_text())
    assert parsed.errors == []
    assert len(parsed.corrections) == len(records) >= 40
    for (_, correction), record in zip(parsed.corrections, records, strict=True):
        assert correction.prompt.replace("{}", correction.subject) == record["prompt"]
        assert (correction.target, correction.original_answer) == (record["target_new"], record["ground_truth"])
        assert correction.source == f"counterfact:{record['case_id']}"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{"prompt": "{} is", "subject": "s", "target": "a", "target": "b"}\n', 1, "the key 'target' appears twice"),
        (
            '{"prompt": "{} is", "subject": "s", "target": "a"}\n{"prompt": "{} is", "prompt": "{} was"}\n',
            2,
            "the key 'prompt' appears twice",
        ),
        ('{\n "prompt": "{} is",\n "subject": "s",\n "subject": "t",\n "target": "a"\n}\n', 1, "'subject' appears"),
        ("[" * 100_000 + "]" * 100_000, None, "the JSON is nested too deeply"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, 1, "the JSON is nested too deeply"),
    ],
)
def test_repeated_keys_and_deep_nesting_are_refused_with_their_line(text, line, message):
    """Python's json lets the last of two keys win silently and overflows the stack on deep nesting."""
    try:
        parsed = parse_corrections_text(text)
    except InvalidInput as error:  # a JSON list is refused as a whole
        assert line is None and message in str(error) and str(error).startswith("line 1: ")
        return
    assert [(e.line, message in e.reason) for e in parsed.errors] == [(line, True)]
