"""Revert request rows: refused with the reason, or queued and audited."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from storage.errors import NotFound
from storage.models import AuditEvent, Checkpoint, RevertRequest
from storage.reverts import RevertRefused, request_revert

MODEL = "sha256:" + "ab" * 32


def _chain(session, pruned: tuple[int, ...] = ()) -> None:
    """Checkpoints 1 <- 2 <- 3 and a branch 2 <- 4 (so 3 is off the current line)."""
    for checkpoint_id, parent in ((1, None), (2, 1), (3, 2), (4, 2)):
        session.add(
            Checkpoint(
                id=checkpoint_id,
                parent_id=parent,
                path=f"m/{checkpoint_id}.safetensors",
                sha256="a" * 64,
                size_bytes=1,
                base_model=MODEL,
                pruned=checkpoint_id in pruned,
                manifest={},
            )
        )
    session.flush()


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (9, NotFound, "no checkpoint with id 9"),
        (1, RevertRefused, "checkpoint 1 was pruned by the retention setting"),
        (3, RevertRefused, "checkpoint 3 is not an ancestor of the current checkpoint 4"),
        (4, RevertRefused, "checkpoint 4 is already the model's current state"),
    ],
)
def test_revert_requests_are_refused_with_the_reason(sessions, target, error, message):
    with sessions.begin() as session:
        _chain(session, pruned=(1,))
    with sessions.begin() as session, pytest.raises(error, match=message):
        request_revert(session, target, "alice")
    with sessions.begin() as session:
        assert session.scalars(select(RevertRequest)).all() == []


def test_a_revert_request_is_queued_and_audited(sessions):
    with sessions.begin() as session:
        _chain(session)
        request = request_revert(session, 2, "alice")
    with sessions.begin() as session:
        event = session.scalars(select(AuditEvent)).one()
        assert (event.kind, event.checkpoint_id, event.payload) == (
            "revert_requested",
            2,
            {"request": request.id, "current_checkpoint": 4},
        )
