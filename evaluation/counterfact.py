"""CounterFact records (EasyEdit's simplified format) as edit requests plus their test prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.requests import EditRequest
from storage.errors import InvalidInput
from storage.intake import PLACEHOLDER, correction_from_record


@dataclass(frozen=True)
class CounterFactRecord:
    case_id: int
    prompt: str
    """The rewrite prompt with the subject written out."""
    subject: str
    target_new: str
    target_true: str
    paraphrase: str
    neighborhood: str
    """A prompt about another subject whose true answer is ``target_true`` too."""

    @property
    def template(self) -> str:
        return self.prompt.replace(self.subject, "{}", 1)

    def request(self) -> EditRequest:
        return EditRequest(
            self.template,
            self.subject,
            self.target_new,
            original=self.target_true,
            paraphrases=(self.paraphrase,),
            neighbors=((self.neighborhood, self.target_true),),
            key=str(self.case_id),
        )


def load_counterfact(path: str | Path, n: int | None = None, offset: int = 0) -> list[CounterFactRecord]:
    """``n`` records of a CounterFact JSON file, from record ``offset`` on (counted in the file,
    so that a slice names the same records whatever is skipped).

    Records are read by the product's own intake (``storage.intake``), so the benchmark edits
    exactly what ``metake submit`` would queue; a record intake refuses (e.g. a subject missing
    from its prompt) is skipped."""
    with open(path) as handle:
        raw = json.load(handle)
    records = []
    for record in raw[offset:]:
        try:
            correction = correction_from_record(record)
        except InvalidInput:
            continue
        records.append(
            CounterFactRecord(
                int(record["case_id"]),
                correction.prompt.replace(PLACEHOLDER, correction.subject, 1),
                correction.subject,
                correction.target,
                correction.original_answer or "",
                correction.paraphrases[0] if correction.paraphrases else correction.prompt,
                correction.neighbors[0].prompt if correction.neighbors else "",
            )
        )
        if n is not None and len(records) == n:
            break
    return records
