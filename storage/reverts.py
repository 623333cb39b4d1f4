"""Revert request rows: recorded by ``metake revert``, checked again and settled by the daemon.

A revert is queued rather than done by the command itself because only the lease holder may
change the model. The daemon performs pending requests between batches, so a revert never
interleaves with an edit. The target must be a checkpoint the current model descends from and
whose file retention has kept; anything else is refused with a reason that says why.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.audit import AuditKind, append_event
from storage.checkpoints import ancestry, head_checkpoint, model_checkpoints
from storage.errors import InvalidInput, NotFound
from storage.models import Checkpoint, Correction, CorrectionStatus, RevertRequest, RevertStatus
from storage.types import utcnow


class RevertRefused(InvalidInput):
    """The checkpoint cannot be reverted to; the message is the reason recorded and shown."""


def check_target(session: Session, checkpoint_id: int) -> tuple[Checkpoint, Checkpoint]:
    """The target checkpoint and its model's current one; RevertRefused/NotFound when not revertible."""
    target = session.get(Checkpoint, checkpoint_id)
    if target is None:
        raise NotFound(f"no checkpoint with id {checkpoint_id}")
    if target.pruned:
        raise RevertRefused(
            f"checkpoint {checkpoint_id} was pruned by the retention setting (its file is deleted; "
            "its record is kept); revert to a kept checkpoint (see `metake checkpoints`)"
        )
    head = head_checkpoint(session, target.model)
    assert head is not None  # the target itself is one of the model's checkpoints
    if head.id == target.id:
        raise RevertRefused(f"checkpoint {checkpoint_id} is already the model's current state")
    if target.id not in ancestry(model_checkpoints(session, target.model), head.id):
        raise RevertRefused(
            f"checkpoint {checkpoint_id} is not an ancestor of the current checkpoint {head.id} "
            "(it lies on a branch an earlier revert left); resubmit its corrections instead"
        )
    return target, head


def request_revert(session: Session, checkpoint_id: int, requested_by: str) -> RevertRequest:
    """Queue a revert to ``checkpoint_id`` after checking it; audited as revert_requested."""
    target, head = check_target(session, checkpoint_id)
    request = RevertRequest(checkpoint_id=target.id, requested_by=requested_by, requested_at=utcnow())
    session.add(request)
    session.flush()
    append_event(
        session,
        AuditKind.REVERT_REQUESTED,
        actor=requested_by,
        checkpoint_id=target.id,
        payload={"request": request.id, "current_checkpoint": head.id},
    )
    return request


def pending_requests(session: Session, model: str) -> list[RevertRequest]:
    """Pending revert requests for the checkpoints of the model named ``model``, oldest first."""
    query = (
        select(RevertRequest)
        .join(Checkpoint, Checkpoint.id == RevertRequest.checkpoint_id)
        .where(RevertRequest.status == RevertStatus.PENDING, Checkpoint.model == model)
        .order_by(RevertRequest.id)
    )
    return list(session.scalars(query))


def refuse(session: Session, request_id: int, reason: str, actor: str) -> None:
    request = session.get(RevertRequest, request_id, with_for_update=True, populate_existing=True)
    assert request is not None
    request.status = RevertStatus.REFUSED
    request.reason = reason
    request.settled_at = utcnow()
    session.flush()
    append_event(
        session,
        AuditKind.REVERT_REFUSED,
        actor=actor,
        checkpoint_id=request.checkpoint_id,
        payload={"request": request.id, "reason": reason},
    )


def settle_done(
    session: Session,
    request_id: int,
    corrections: Sequence[Correction],
    new_checkpoint: Checkpoint,
    previous_head_id: int,
    actor: str,
) -> list[int]:
    """Mark the undone corrections reverted and the request done; returns the reverted ids."""
    request = session.get(RevertRequest, request_id, with_for_update=True, populate_existing=True)
    assert request is not None
    reverted: list[int] = []
    for correction in corrections:
        if correction.status != CorrectionStatus.APPLIED:
            continue
        correction.status = CorrectionStatus.REVERTED
        reverted.append(correction.id)
    request.status = RevertStatus.DONE
    request.settled_at = utcnow()
    request.result_checkpoint_id = new_checkpoint.id
    session.flush()
    for correction_id in reverted:
        append_event(
            session,
            AuditKind.REVERTED,
            actor=actor,
            correction_id=correction_id,
            checkpoint_id=new_checkpoint.id,
            payload={"request": request.id, "restored_checkpoint": request.checkpoint_id},
        )
    append_event(
        session,
        AuditKind.REVERTED,
        actor=actor,
        checkpoint_id=new_checkpoint.id,
        payload={
            "request": request.id,
            "restored_checkpoint": request.checkpoint_id,
            "previous_checkpoint": previous_head_id,
            "reverted_corrections": reverted,
        },
    )
    return reverted
