"""Queue semantics: submission, supersession, claim order, release and settling, all audited."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from store_fixtures import EARLIER_FACT, MOTHER_TONGUE, SUPERSEDING_BATCH, fact, superseding_rows

from storage import queue
from storage.audit import verify_chain
from storage.audit_rows import verify_rows
from storage.errors import InvalidTransition
from storage.intake import make_correction
from storage.leases import acquire
from storage.models import AuditEvent, Correction, CorrectionStatus, Edit
from storage.queue import (
    claim_batch,
    mark_applied,
    mark_failed,
    mark_rejected,
    release_claimed,
    release_stale_claims,
    resubmit_for_rehearsal,
    submit,
    submit_many,
)


def events(session) -> list[tuple[str, int | None, str]]:
    rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id))
    return [(e.kind, e.correction_id, e.actor) for e in rows]


def test_submit_stores_the_correction_and_audits_it(sessions):
    correction = make_correction(
        MOTHER_TONGUE,
        "Danielle Darrieux",
        "English",
        paraphrases=["Danielle Darrieux speaks"],
        neighbors=[{"prompt": "The mother tongue of Léon Blum is", "answer": "French"}],
        priority=3,
        original_answer="French",
    )
    with sessions.begin() as session:
        new_id = submit(session, correction, "alice")
    with sessions() as session:
        row = session.get(Correction, new_id)
        assert (row.prompt, row.subject, row.target, row.original_answer) == (
            MOTHER_TONGUE,
            "Danielle Darrieux",
            "English",
            "French",
        )
        assert row.paraphrases == ["Danielle Darrieux speaks"]
        assert row.neighbors == [{"prompt": "The mother tongue of Léon Blum is", "answer": "French"}]
        assert (row.status, row.priority, row.attempts, row.submitter) == (
            CorrectionStatus.PENDING,
            3,
            0,
            "alice",
        )
        assert row.submitted_at.tzinfo is not None
        assert row.filled_prompt() == "The mother tongue of Danielle Darrieux is"
        assert events(session) == [("submitted", new_id, "alice")]
        event = session.scalars(select(AuditEvent)).one()
        assert event.payload == {  # the whole correction, so that audit verify can check the row
            "model": "default",
            "prompt": MOTHER_TONGUE,
            "subject": "Danielle Darrieux",
            "target": "English",
            "original_answer": "French",
            "paraphrases": ["Danielle Darrieux speaks"],
            "neighbors": [{"prompt": "The mother tongue of Léon Blum is", "answer": "French"}],
            "priority": 3,
        }


def test_newer_pending_correction_supersedes_the_older_one(sessions):
    with sessions.begin() as session:
        first = submit(session, fact("Danielle Darrieux", "English"), "alice")
        other_prompt = submit(session, fact("Danielle Darrieux", "Paris", prompt="{} was born in"), "alice")
    with sessions.begin() as session:
        second = submit(session, fact("Danielle Darrieux", "German"), "bob")
    with sessions() as session:
        old = session.get(Correction, first)
        assert (old.status, old.superseded_by) == (CorrectionStatus.SUPERSEDED, second)
        assert session.get(Correction, second).status == CorrectionStatus.PENDING
        assert session.get(Correction, other_prompt).status == CorrectionStatus.PENDING
        assert events(session)[-2:] == [("submitted", second, "bob"), ("superseded", first, "bob")]
        superseded = session.scalars(select(AuditEvent).where(AuditEvent.kind == "superseded")).one()
        assert superseded.payload == {"superseded_by": second}


def test_corrections_being_applied_are_not_superseded(sessions):
    with sessions.begin() as session:
        first = submit(session, fact("Danielle Darrieux", "English"), "alice")
        claim_batch(session, 1, "worker")
        second = submit(session, fact("Danielle Darrieux", "German"), "alice")
    with sessions() as session:
        assert session.get(Correction, first).status == CorrectionStatus.APPLYING
        assert session.get(Correction, second).status == CorrectionStatus.PENDING


def test_claim_order_is_priority_then_submission(sessions):
    with sessions.begin() as session:
        ids = submit_many(
            session,
            [fact("a"), fact("b", priority=5), fact("c"), fact("d", priority=5), fact("e", priority=-1)],
            "alice",
        )
    a, b, c, d, e = ids
    with sessions.begin() as session:
        batch = claim_batch(session, 3, "w1")
        assert [x.id for x in batch] == [b, d, a]
        assert all(x.status == CorrectionStatus.APPLYING and x.attempts == 1 for x in batch)
        assert {x.claimed_by for x in batch} == {"w1"}
    with sessions.begin() as session:
        assert [x.id for x in claim_batch(session, 10, "w2")] == [c, e]
    with sessions.begin() as session:
        assert claim_batch(session, 10, "w3") == []
    with sessions() as session:
        claimed = [(kind, cid, actor) for kind, cid, actor in events(session) if kind == "claimed"]
        assert claimed == [("claimed", i, w) for i, w in [(b, "w1"), (d, "w1"), (a, "w1"), (c, "w2"), (e, "w2")]]
        assert session.scalars(select(AuditEvent).where(AuditEvent.kind == "claimed")).first().payload == {"attempt": 1}


def test_claim_rejects_a_zero_batch(sessions):
    with sessions.begin() as session, pytest.raises(ValueError, match="at least 1"):
        claim_batch(session, 0, "w")


def test_release_puts_a_crashed_workers_claims_back(sessions):
    with sessions.begin() as session:
        first, second = submit_many(session, [fact("a"), fact("b")], "alice")
        claim_batch(session, 1, "crashed")
        claim_batch(session, 1, "alive")
    with sessions.begin() as session:
        assert release_claimed(session, "crashed", actor="daemon", reason="restart") == [first]
    with sessions.begin() as session:
        row = session.get(Correction, first)
        assert (row.status, row.claimed_by, row.attempts) == (CorrectionStatus.PENDING, None, 1)
        assert session.get(Correction, second).status == CorrectionStatus.APPLYING
        released = session.scalars(select(AuditEvent).where(AuditEvent.kind == "released")).one()
        assert (released.correction_id, released.payload) == (
            first,
            {"worker": "crashed", "reason": "restart"},
        )
        again = claim_batch(session, 5, "new")
        assert [(x.id, x.attempts) for x in again] == [(first, 2)]
    with sessions.begin() as session:
        assert sorted(release_claimed(session, None, actor="admin", reason="reset")) == [first, second]


def test_settling_claimed_corrections(sessions):
    with sessions.begin() as session:
        ids = submit_many(session, [fact("a"), fact("b"), fact("c"), fact("d")], "alice")
        batch = claim_batch(session, 4, "w")
        edit = Edit(method="metake", model="smollm2-135m", hparams={"lr": 0.5}, layers=[3, 4])
        session.add(edit)
        session.flush()
        edit_id = edit.id
    with sessions.begin() as session:
        mark_applied(session, batch[:2], edit_id, worker="w")
        mark_failed(session, batch[2], "CUDA out of memory", worker="w", retry=True)
        mark_rejected(session, batch[3], "subject merges with the next token", worker="w")
    with sessions() as session:
        rows = {i: session.get(Correction, i) for i in ids}
        assert [(rows[i].status, rows[i].edit_id) for i in ids[:2]] == [(CorrectionStatus.APPLIED, edit_id)] * 2
        assert (rows[ids[2]].status, rows[ids[2]].last_error) == (
            CorrectionStatus.PENDING,
            "CUDA out of memory",
        )
        assert (rows[ids[3]].status, rows[ids[3]].last_error) == (
            CorrectionStatus.REJECTED,
            "subject merges with the next token",
        )
        assert [kind for kind, _, _ in events(session)][-4:] == ["applied", "applied", "failed", "rejected"]
        assert verify_chain(session) is None


def test_failing_for_good_and_transition_guards(sessions):
    with sessions.begin() as session:
        (only,) = submit_many(session, [fact("a")], "alice")
    with sessions.begin() as session:
        pending = session.get(Correction, only)
        with pytest.raises(InvalidTransition, match=f"correction {only} is pending; only applying ones"):
            mark_failed(session, pending, "x", worker="w")
    with sessions.begin() as session:
        (claimed,) = claim_batch(session, 1, "w")
    intruder = pytest.raises(InvalidTransition, match=f"correction {only} is claimed by w, not intruder")
    with sessions.begin() as session, intruder:
        mark_rejected(session, claimed, "x", worker="intruder")
    with sessions.begin() as session:
        mark_failed(session, claimed, "model diverged", worker="w")
    with sessions() as session:
        assert session.get(Correction, only).status == CorrectionStatus.FAILED


def test_recovery_releases_only_claims_of_workers_without_a_live_lease(sessions):
    with sessions.begin() as session:
        for subject in ("France", "Italy", "Spain"):
            submit(session, make_correction("The capital of {} is", subject, "Rome"), "alice")
    with sessions.begin() as session:
        acquire(session, "sha256:other-model", "daemon@h:2:live01", 30)
        claim_batch(session, 1, "daemon@h:1:dead01")
        claim_batch(session, 1, "daemon@h:2:live01")
    with sessions.begin() as session:
        released = release_stale_claims(session, "daemon@h:3:me0001", "recovery")
    assert released == [1]
    with sessions.begin() as session:
        statuses = {c.id: c.status for c in session.scalars(select(Correction))}
    assert statuses == {1: CorrectionStatus.PENDING, 2: CorrectionStatus.APPLYING, 3: CorrectionStatus.PENDING}


def test_a_bulk_submit_supersedes_within_and_across_its_chunks(sessions, monkeypatch):
    """Chunks share queries and audit appends; the result must be that of one submit at a time."""
    monkeypatch.setattr(queue, "SUBMIT_CHUNK", 2)
    with sessions.begin() as session:
        earlier = submit(session, EARLIER_FACT, "alice")
    with sessions.begin() as session:
        ids = submit_many(session, SUPERSEDING_BATCH, "bob")
    with sessions() as session:
        rows = {c.id: (c.target, c.status.value, c.superseded_by) for c in session.scalars(select(Correction))}
        assert rows == superseding_rows(earlier, ids)
        assert [e[:2] for e in events(session)][1:] == [
            ("submitted", ids[0]),
            ("superseded", earlier),
            ("submitted", ids[1]),
            ("submitted", ids[2]),
            ("superseded", ids[0]),
            ("submitted", ids[3]),
            ("superseded", ids[1]),
            ("submitted", ids[4]),
            ("superseded", ids[2]),
        ]
        assert verify_chain(session) is None and verify_rows(session).mismatch is None


def test_each_model_has_its_own_queue(sessions):
    with sessions.begin() as session:
        llama = submit(session, fact("Danielle Darrieux", "English"), "alice", model="llama-bot")
        gpt = submit(session, fact("Danielle Darrieux", "German"), "alice", model="gpt-bot")
        default = submit(session, fact("Toko Yasuda", "piano"), "alice")
    with sessions.begin() as session:  # the same fact for another model supersedes nothing
        assert session.get(Correction, llama).status == CorrectionStatus.PENDING
        assert (queue.pending_count(session, "gpt-bot"), queue.pending_count(session)) == (1, 3)
        newer = submit(session, fact("Danielle Darrieux", "Spanish"), "bob", model="gpt-bot")
    with sessions.begin() as session:
        assert session.get(Correction, gpt).superseded_by == newer
        assert session.get(Correction, llama).status == CorrectionStatus.PENDING
        claimed = claim_batch(session, 10, "daemon@h:1:a", model="llama-bot")
        assert [c.id for c in claimed] == [llama]
    with sessions.begin() as session:
        assert [c.id for c in claim_batch(session, 10, "daemon@h:2:b")] == [default]
        assert [c.id for c in claim_batch(session, 10, "daemon@h:3:c", model="gpt-bot")] == [newer]
        assert claim_batch(session, 10, "daemon@h:3:c", model="nobody") == []
    with sessions.begin() as session:  # recovery for one model leaves the others' claims alone
        released = queue.release_stale_claims(session, "daemon@h:3:c", "test", model="llama-bot")
        assert released == [llama]
        assert session.get(Correction, default).status == CorrectionStatus.APPLYING
    with sessions() as session:
        assert verify_chain(session) is None and verify_rows(session).mismatch is None


def _apply_all(session, worker: str = "w") -> list[Correction]:
    batch = claim_batch(session, 100, worker)
    edit = Edit(method="metake", model="smollm2-135m", hparams={}, layers=[4])
    session.add(edit)
    session.flush()
    mark_applied(session, batch, edit.id, worker=worker)
    return batch


def test_rehearsal_queues_copies_of_the_newest_word_on_each_fact_a_bounded_number_of_times(sessions):
    """A rehearsed correction comes back as a new pending one with its fields and the source
    ``rehearsal N of #original``; a fact with a pending correction (it would be superseded), an
    older applied correction of a fact applied again since (it would undo the newer), and an
    original rehearsed ``max_rehearsals`` times are left out; every step is in the audit chain."""
    with sessions.begin() as session:
        first = make_correction(MOTHER_TONGUE, "Danielle Darrieux", "English", paraphrases=["Darrieux speaks"])
        ids = submit_many(session, [first, fact("Toko Yasuda"), fact("Ludwig Mies"), fact("Nabi Tajima")], "alice")
        _apply_all(session)
        tajima = submit(session, fact("Nabi Tajima", "Korean"), "bob")
        _apply_all(session)  # Tajima's newer correction is applied: the older one is not rehearsed
        mies = submit(session, fact("Ludwig Mies", "Dutch"), "bob")  # pending: Mies is not rehearsed
    with sessions.begin() as session:
        rows = [session.get(Correction, i) for i in [*ids, tajima]]
        queued = resubmit_for_rehearsal(session, rows, "daemon:w", max_rehearsals=2)
        assert list(queued) == [ids[0], ids[1], tajima]
        copy = session.get(Correction, queued[ids[0]])
        assert (copy.status, copy.subject, copy.target, copy.paraphrases) == (
            CorrectionStatus.PENDING,
            "Danielle Darrieux",
            "English",
            ["Darrieux speaks"],
        )
        assert copy.source == f"rehearsal 1 of #{ids[0]}" and copy.submitter == "daemon:w"
        assert session.get(Correction, mies).status == CorrectionStatus.PENDING  # not superseded by a copy
        assert resubmit_for_rehearsal(session, rows[:1], "daemon:w") == {}  # its copy is pending now
    with sessions.begin() as session:
        _apply_all(session)
        again = resubmit_for_rehearsal(session, [session.get(Correction, queued[ids[0]])], "d", max_rehearsals=2)
        assert session.get(Correction, again[queued[ids[0]]]).source == f"rehearsal 2 of #{ids[0]}"
        _apply_all(session)
        third = session.get(Correction, again[queued[ids[0]]])
        assert resubmit_for_rehearsal(session, [third], "d", max_rehearsals=2) == {}  # twice is the bound
        assert verify_chain(session) is None
