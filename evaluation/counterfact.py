"""CounterFact records (EasyEdit's simplified format) as edit requests plus their test prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.requests import EditRequest


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
    so that a slice names the same records whatever is filtered), whose subject occurs in its prompt."""
    with open(path) as handle:
        raw = json.load(handle)
    records = [
        CounterFactRecord(
            int(r["case_id"]),
            r["prompt"],
            r["subject"],
            r["target_new"],
            r["ground_truth"],
            r["rephrase_prompt"],
            r["locality_prompt"],
        )
        for r in raw[offset:]
        if r["subject"] in r["prompt"]
    ]
    return records[:n] if n is not None else records
