"""Edit requests and the token bookkeeping that places them in a model's input.

A request is only editable if the tokenizer puts a token boundary right after the subject: the
edit key is read at the subject's last token, so a subject merged into the next token has no
key. Such requests are rejected with a reason instead of being edited at the wrong place.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase


class RequestRejected(ValueError):  # noqa: N818 - the name says what happened to the request
    """A request that cannot be edited; the message is the reason recorded for it."""


@dataclass(frozen=True)
class EditRequest:
    """One fact correction: ``prompt.format(subject)`` should be continued by ``target``."""

    prompt: str
    subject: str
    target: str
    original: str | None = None
    """The answer the model is expected to give before the edit (CounterFact's ``target_true``)."""
    paraphrases: tuple[str, ...] = ()
    """Other wordings with the subject written out, for measuring generalisation."""
    neighbors: tuple[tuple[str, str], ...] = ()
    """(prompt, answer) pairs about other subjects that must keep their answers."""
    key: str | None = None
    """The caller's identifier (the correction id), echoed in diagnostics."""

    @property
    def text(self) -> str:
        return self.prompt.replace("{}", self.subject)


def check_request(request: EditRequest) -> None:
    """Raise :class:`RequestRejected` for requests that no tokenizer could place."""
    if request.prompt.count("{}") != 1:
        raise RequestRejected("the prompt must contain exactly one '{}' where the subject goes")
    if not request.subject.strip():
        raise RequestRejected("the subject is empty")
    if not request.target.strip():
        raise RequestRejected("the target is empty")
    for label, value in (("prompt", request.prompt), ("subject", request.subject), ("target", request.target)):
        if any(unicodedata.category(ch) == "Cc" for ch in value):
            raise RequestRejected(f"the {label} contains control characters")


def encode_with_subject(tokenizer: PreTrainedTokenizerBase, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``template`` filled with ``subject``, and the index of the subject's last token."""
    before, after = template.split("{}", 1)
    full = tokenizer(before + subject + after).input_ids
    head = tokenizer(before + subject).input_ids
    if not head or full[: len(head)] != head:
        raise RequestRejected(
            f"the tokenizer merges the end of the subject {subject!r} with the text after it; "
            "the subject's last token cannot be located"
        )
    return full, len(head) - 1


def encode_target(tokenizer: PreTrainedTokenizerBase, prompt_text: str, target: str) -> list[int]:
    """Token ids of the target as a continuation of ``prompt_text`` (a leading space unless one is there)."""
    text = target.strip() if prompt_text.endswith((" ", "\n")) else " " + target.strip()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise RequestRejected(f"the target {target!r} tokenizes to nothing")
    return ids


@dataclass
class Row:
    """One sequence of a batch: its ids, where the subject ends, whose request it is, what to score."""

    ids: list[int]
    subject_pos: int = -1
    request: int = 0
    target: list[int] = field(default_factory=list)
    """Tokens that follow ``ids``' prompt part; their log-probabilities are scored."""
    prompt_len: int = 0


@dataclass
class TokenBatch:
    """Right-padded tensors for a list of rows, with index tensors for subjects and targets."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor
    """Index of each row's last real token."""
    subject_pos: torch.Tensor
    request: torch.Tensor
    target_rows: torch.Tensor
    target_positions: torch.Tensor
    """Positions whose logits predict the target tokens."""
    target_tokens: torch.Tensor

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.input_ids.shape[0], device=self.input_ids.device)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def make_batch(rows: list[Row], pad_id: int, device: torch.device | str) -> TokenBatch:
    """Pad rows to one tensor. Rows that score a target carry ``prompt + target[:-1]`` as input."""
    inputs = [r.ids + r.target[:-1] if r.target else r.ids for r in rows]
    width = max(len(x) for x in inputs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    t_rows, t_pos, t_tok = [], [], []
    for i, (row, seq) in enumerate(zip(rows, inputs, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for j, token in enumerate(row.target):
            t_rows.append(i)
            t_pos.append(len(row.ids) - 1 + j)
            t_tok.append(token)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return TokenBatch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        last=as_long([len(x) - 1 for x in inputs]),
        subject_pos=as_long([r.subject_pos for r in rows]),
        request=as_long([r.request for r in rows]),
        target_rows=as_long(t_rows),
        target_positions=as_long(t_pos),
        target_tokens=as_long(t_tok),
    )
