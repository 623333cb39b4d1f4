"""Performing revert requests: restore a checkpoint exactly, record it as a new checkpoint.

``metake revert`` only queues a request (storage.reverts), because only the lease holder may
change the model. The daemon performs pending requests between batches, oldest first, so a
revert never interleaves with an edit. The target is checked again here; a request that can no
longer be done is refused with the reason recorded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from daemon.checkpoint_files import Origin
from daemon.faults import crash_point
from daemon.held import DaemonError, HeldModel
from storage.checkpoints import applied_corrections, audit_checkpoint
from storage.queue import lock_corrections
from storage.reverts import RevertRefused, check_target, pending_requests, refuse, settle_done


@dataclass
class RevertReport:
    request_id: int
    restored_checkpoint: int
    new_checkpoint: int | None
    reverted: list[int]
    refused: str | None = None
    seconds: float = 0.0


def perform_reverts(held: HeldModel) -> list[RevertReport]:
    """Perform the held model's pending revert requests, oldest first."""
    with held.sessions() as session:
        requests = [(r.id, r.checkpoint_id) for r in pending_requests(session, held.name)]
    return [perform_revert(held, request_id, checkpoint_id) for request_id, checkpoint_id in requests]


def perform_revert(held: HeldModel, request_id: int, checkpoint_id: int) -> RevertReport:
    """Restore a checkpoint exactly, then record it as a new checkpoint whose parent it is."""
    started = time.perf_counter()
    try:
        with held.sessions() as session:
            target, head = check_target(session, checkpoint_id)
        contents = held.read(target)
    except (RevertRefused, DaemonError) as error:
        with held.lease.transaction() as session:
            refuse(session, request_id, str(error), held.actor)
        held.event(logging.WARNING, "revert_refused", request=request_id, checkpoint=checkpoint_id, reason=str(error))
        return RevertReport(request_id, checkpoint_id, None, [], refused=str(error))
    undone = sorted(set(applied_corrections(head)) - set(applied_corrections(target)))
    with held.tentative() as tentative:
        held.install(contents, target)
        crash_point("during_revert")
        new = held.write(
            tentative,
            contents.weights,
            contents.state,
            Origin(
                "revert",
                parent=target.id,
                batch=[],
                applied=applied_corrections(target),
                extra={"reverted_from": head.id, "revert_request": request_id, "reverted_corrections": undone},
            ),
        )
        with held.lease.transaction() as session:
            rows = lock_corrections(session, undone)
            row = held.add(session, new, parent_id=target.id)
            audit_checkpoint(session, row, held.actor)
            reverted = settle_done(session, request_id, rows, row, head.id, held.actor)
            pruned = held.prune(session)
    held.current = row
    held.delete_pruned(pruned)
    seconds = time.perf_counter() - started
    held.event(
        logging.INFO,
        "revert_performed",
        request=request_id,
        restored=target.id,
        checkpoint=row.id,
        reverted=reverted,
        seconds=seconds,
    )
    return RevertReport(request_id, target.id, row.id, reverted, seconds=seconds)
