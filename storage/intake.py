"""Intake: what a correction submission looks like, how it is checked, and how files of them are read.

Everything here runs before the database is touched, so a rejected submission writes nothing.
Accepted inputs: plain records ``{prompt, subject, target, paraphrases?, neighbors?, priority?,
original_answer?}`` where ``prompt`` is a template with one ``{}`` for the subject, and EasyEdit
CounterFact records ``{case_id, prompt, subject, target_new, ground_truth, rephrase_prompt,
locality_prompt, locality_ground_truth}`` where ``prompt`` has the subject written out. A file
is JSON Lines, or one JSON list, or a single JSON object.
"""

from __future__ import annotations

import getpass
import json
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.errors import InvalidInput
from storage.models import MODEL_NAME_MAX_CHARS, PROMPT_MAX_CHARS, SUBJECT_MAX_CHARS, TARGET_MAX_CHARS

PLACEHOLDER = "{}"
PRIORITY_LIMIT = 1_000_000
SUBMITTER_MAX_CHARS = 100
# Bidirectional embedding/override/isolate marks: invisible, and able to disguise text.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_JOINERS = frozenset("\u200c\u200d")
_PLAIN_KEYS = frozenset({"prompt", "subject", "target", "paraphrases", "neighbors", "priority", "original_answer"})
_COUNTERFACT_KEYS = frozenset(
    {
        "case_id",
        "prompt",
        "subject",
        "target_new",
        "ground_truth",
        "rephrase_prompt",
        "locality_prompt",
        "locality_ground_truth",
        "priority",
    }
)


@dataclass(frozen=True)
class Neighbor:
    """A prompt about something else, with the answer the edit must leave unchanged."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class CorrectionInput:
    """A validated correction, ready for storage.queue.submit; build it with make_correction."""

    prompt: str
    subject: str
    target: str
    paraphrases: tuple[str, ...] = ()
    neighbors: tuple[Neighbor, ...] = ()
    priority: int = 0
    original_answer: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class RecordError:
    """One rejected record of a file: its line and the reason."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class ParsedFile:
    """The valid corrections of a file (with their line numbers) and the rejected records."""

    corrections: list[tuple[int, CorrectionInput]] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)


def _control_character(value: str, allow_layout: bool = False) -> str | None:
    """The first character a fact must not contain, described, or None.

    Refused: control characters, line and paragraph separators, bidi controls, invisible format
    characters (U+200B and the like; the joiners U+200C/U+200D stay, some scripts need them) and
    lone surrogates (what undecodable bytes in an argument become; they are not Unicode text).
    """
    for index, char in enumerate(value):
        if char in "\n\t" and allow_layout:
            continue
        category = unicodedata.category(char)
        where = f"(U+{ord(char):04X}) at character {index + 1}"
        if category in ("Cc", "Zl", "Zp") or char in _BIDI_CONTROLS:
            return f"a control character {where}"
        if category == "Cs":
            return f"a lone surrogate {where}, which is not Unicode text (undecodable input?)"
        if category == "Cf" and char not in _JOINERS:
            return f"an invisible format character {where}"
    return None


def _text(value: Any, label: str, limit: int, *, allow_layout: bool = False) -> str:
    """A stripped, non-empty, printable string of at most ``limit`` characters."""
    if not isinstance(value, str):
        raise InvalidInput(f"the {label} must be a string, not {_json_type(value)}")
    found = _control_character(value, allow_layout)
    if found:
        raise InvalidInput(f"the {label} contains {found}")
    text = unicodedata.normalize("NFC", value.strip())  # one stored form for one visible text
    if not text:
        raise InvalidInput(f"the {label} is empty")
    if len(text) > limit:
        raise InvalidInput(f"the {label} is {len(text)} characters long; the limit is {limit}")
    return text


def _template(value: Any, subject: str) -> str:
    prompt = _text(value, "prompt", PROMPT_MAX_CHARS)
    placeholders = prompt.count(PLACEHOLDER)
    if placeholders == 0:
        hint = f"; write '{{}}' in place of {subject!r}" if subject in prompt else ""
        raise InvalidInput(f"the prompt has no '{{}}' where the subject goes{hint}")
    if placeholders > 1:
        raise InvalidInput(f"the prompt has {placeholders} '{{}}' placeholders; exactly one is allowed")
    return prompt


def _complete_prompt(value: Any, label: str) -> str:
    """A paraphrase or neighbour prompt: the subject written out; may hold newlines and tabs."""
    prompt = _text(value, label, PROMPT_MAX_CHARS, allow_layout=True)
    if PLACEHOLDER in prompt:
        raise InvalidInput(f"the {label} contains '{{}}'; write the subject out in full")
    return prompt


def _priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"the priority must be an integer, not {_json_type(value)}")
    if abs(value) > PRIORITY_LIMIT:
        raise InvalidInput(f"the priority {value} is outside -{PRIORITY_LIMIT}..{PRIORITY_LIMIT}")
    return value


def _json_type(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list"}
    names |= {dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def make_correction(
    prompt: Any,
    subject: Any,
    target: Any,
    *,
    paraphrases: Sequence[Any] = (),
    neighbors: Sequence[Neighbor | Mapping[str, Any]] = (),
    priority: Any = 0,
    original_answer: Any = None,
    source: str | None = None,
) -> CorrectionInput:
    """Check and normalise (strip) the fields; raise InvalidInput with a one-line reason."""
    clean_subject = _text(subject, "subject", SUBJECT_MAX_CHARS)
    clean_prompt = _template(prompt, clean_subject)
    clean_target = _text(target, "target", TARGET_MAX_CHARS)
    if isinstance(paraphrases, str) or not isinstance(paraphrases, Sequence):
        raise InvalidInput(f"the paraphrases must be a list of prompts, not {_json_type(paraphrases)}")
    clean_paraphrases = tuple(
        _complete_prompt(text, f"paraphrase {index}") for index, text in enumerate(paraphrases, 1)
    )
    if isinstance(neighbors, str) or not isinstance(neighbors, Sequence):
        raise InvalidInput(f"the neighbors must be a list of {{prompt, answer}}, not {_json_type(neighbors)}")
    clean_neighbors = tuple(_neighbor(item, index) for index, item in enumerate(neighbors, 1))
    clean_original = None if original_answer is None else _text(original_answer, "original answer", TARGET_MAX_CHARS)
    return CorrectionInput(
        prompt=clean_prompt,
        subject=clean_subject,
        target=clean_target,
        paraphrases=clean_paraphrases,
        neighbors=clean_neighbors,
        priority=_priority(priority),
        original_answer=clean_original,
        source=source,
    )


def _neighbor(item: Neighbor | Mapping[str, Any], index: int) -> Neighbor:
    if isinstance(item, Neighbor):
        item = {"prompt": item.prompt, "answer": item.answer}
    if not isinstance(item, Mapping) or set(item) != {"prompt", "answer"}:
        raise InvalidInput(f"neighbor {index} must be an object with exactly the keys prompt and answer")
    return Neighbor(
        prompt=_complete_prompt(item["prompt"], f"neighbor {index} prompt"),
        answer=_text(item["answer"], f"neighbor {index} answer", TARGET_MAX_CHARS),
    )


def parse_neighbor_option(value: str) -> Neighbor:
    """Parse the CLI form ``PROMPT=>ANSWER`` (split at the last ``=>``)."""
    prompt, arrow, answer = value.rpartition("=>")
    if not arrow:
        raise InvalidInput(f"--neighbor {value!r} is not of the form 'PROMPT=>ANSWER'")
    return _neighbor({"prompt": prompt, "answer": answer}, 1)


def check_submitter(value: str) -> str:
    """The name recorded as submitter and audit actor."""
    return _text(value, "submitter name", SUBMITTER_MAX_CHARS)


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_model_name(value: str) -> str:
    """A model's name (``--model`` of submit, ``--name`` of the daemon): letters, digits, ``.``, ``_``
    and ``-``, starting with a letter or digit, so that it is also a safe folder name."""
    if not _MODEL_NAME.fullmatch(value) or len(value) > MODEL_NAME_MAX_CHARS:
        raise InvalidInput(
            f"model name {value[:40]!r} must be 1-{MODEL_NAME_MAX_CHARS} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def login_name() -> str:
    """The user's login name, the default submitter and requester; "unknown" where there is none."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (e.g. a container user without a passwd entry)
        return "unknown"


def correction_from_record(record: Any, default_priority: int = 0) -> CorrectionInput:
    """A correction from one decoded JSON record, plain or CounterFact."""
    if not isinstance(record, dict):
        raise InvalidInput(f"expected a JSON object, got {_json_type(record)}")
    if "target_new" in record or "case_id" in record:
        return _from_counterfact(record, default_priority)
    _check_keys(record, _PLAIN_KEYS, required=("prompt", "subject", "target"))
    return make_correction(
        record["prompt"],
        record["subject"],
        record["target"],
        paraphrases=record.get("paraphrases", ()),
        neighbors=record.get("neighbors", ()),
        priority=record.get("priority", default_priority),
        original_answer=record.get("original_answer"),
    )


def _from_counterfact(record: dict[str, Any], default_priority: int) -> CorrectionInput:
    _check_keys(record, _COUNTERFACT_KEYS, required=("prompt", "subject", "target_new"))
    subject = _text(record["subject"], "subject", SUBJECT_MAX_CHARS)
    prompt = _text(record["prompt"], "prompt", PROMPT_MAX_CHARS)
    if subject not in prompt:
        raise InvalidInput(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    if PLACEHOLDER in prompt:
        raise InvalidInput("the prompt of a CounterFact record must have the subject written out, not '{}'")
    neighbors: list[dict[str, Any]] = []
    if record.get("locality_prompt") is not None or record.get("locality_ground_truth") is not None:
        neighbors.append({"prompt": record.get("locality_prompt"), "answer": record.get("locality_ground_truth")})
    rephrase = record.get("rephrase_prompt")
    case_id = record.get("case_id")
    return make_correction(
        prompt.replace(subject, PLACEHOLDER, 1),
        subject,
        record["target_new"],
        paraphrases=() if rephrase is None else (rephrase,),
        neighbors=neighbors,
        priority=record.get("priority", default_priority),
        original_answer=record.get("ground_truth"),
        source=None if case_id is None else f"counterfact:{case_id}",
    )


def _check_keys(record: Mapping[str, Any], allowed: frozenset[str], required: Sequence[str]) -> None:
    unknown = sorted(set(record) - allowed)
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    for key in required:
        if key not in record:
            raise InvalidInput(f"missing field {key!r}")


def parse_corrections_text(text: str, default_priority: int = 0) -> ParsedFile:
    """Validate every record of a JSON Lines / JSON list / JSON object text.

    Raises InvalidInput when the text as a whole cannot be read (no records, or a JSON list that
    is malformed); problems with single records are collected in ``errors`` instead.
    """
    parsed = ParsedFile()
    for line, record in _records(text):
        if isinstance(record, RecordError):
            parsed.errors.append(record)
            continue
        try:
            parsed.corrections.append((line, correction_from_record(record, default_priority)))
        except InvalidInput as error:
            parsed.errors.append(RecordError(line, str(error)))
    if not parsed.corrections and not parsed.errors:
        raise InvalidInput("the file contains no records")
    return parsed


def read_corrections_file(path: Path, default_priority: int = 0) -> ParsedFile:
    """Read and validate a corrections file; an unreadable or non-UTF-8 file raises InvalidInput."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidInput(f"cannot read {path}: {error.strerror or error}") from error
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise InvalidInput(f"{path} line {line}: not UTF-8 text") from error
    try:
        return parse_corrections_text(text, default_priority)
    except InvalidInput as error:
        raise InvalidInput(f"{path}: {error}") from error


class _Refused(ValueError):
    """Valid JSON syntax that is still refused: a repeated key, or nesting too deep to decode."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _Refused(f"the key {key!r} appears twice in one object")
        record[key] = value
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _decode(text: str, position: int = 0) -> tuple[Any, int]:
    """``raw_decode`` that refuses repeated keys (JSON lets the last win silently) and deep nesting."""
    try:
        return _DECODER.raw_decode(text, position)
    except RecursionError as error:
        raise _Refused("the JSON is nested too deeply") from error


def _loads(text: str) -> Any:
    value, end = _decode(text, _skip_space(text, 0))
    if text[end:].strip():
        raise json.JSONDecodeError("Extra data", text, _skip_space(text, end))
    return value


def _is_one_object(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    except RecursionError:
        return True
    return True


def _records(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, decoded record or RecordError) for each record of the text."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _json_list_items(text)
        return
    if stripped.startswith("{"):
        first = text[: len(text) - len(stripped)].count("\n") + 1
        try:
            whole = _loads(text)
        except json.JSONDecodeError:
            pass  # not one object: JSON Lines
        except _Refused as error:
            if _is_one_object(text):  # else JSON Lines, refused line by line below
                yield first, RecordError(first, str(error))
                return
        else:
            yield first, whole
            return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, _loads(line)
        except json.JSONDecodeError as error:
            yield number, RecordError(number, f"malformed JSON: {error.msg} (column {error.colno})")
        except _Refused as error:
            yield number, RecordError(number, str(error))


def _json_list_items(text: str) -> Iterator[tuple[int, Any]]:
    """Decode a top-level JSON list element by element, keeping each element's line number."""
    position = _skip_space(text, text.index("[") + 1)
    line, counted_to = 1, 0

    def line_at(offset: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, offset)
        counted_to = offset
        return line

    def malformed(offset: int, reason: str) -> InvalidInput:
        return InvalidInput(f"line {line_at(offset)}: malformed JSON: {reason}")

    if position < len(text) and text[position] == "]":
        if text[position + 1 :].strip():
            raise malformed(_skip_space(text, position + 1), "extra data after the list")
        return
    while True:
        try:
            value, end = _decode(text, position)
        except json.JSONDecodeError as error:
            raise InvalidInput(f"line {error.lineno}: malformed JSON: {error.msg} (column {error.colno})") from error
        except _Refused as error:
            raise InvalidInput(f"line {line_at(position)}: {error}") from error
        yield line_at(position), value
        position = _skip_space(text, end)
        if position >= len(text):
            raise malformed(len(text), "the list is not closed with ']'")
        if text[position] == "]":
            if text[position + 1 :].strip():
                raise malformed(_skip_space(text, position + 1), "extra data after the list")
            return
        if text[position] != ",":
            raise malformed(position, "expected ',' or ']' between list items")
        position = _skip_space(text, position + 1)


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
