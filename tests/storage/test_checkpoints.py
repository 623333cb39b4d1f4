"""Checkpoint rows: which files retention prunes."""

from __future__ import annotations

from storage.checkpoints import Retention, checkpoints_to_prune


def test_retention_keeps_the_newest_every_mth_the_first_and_protected():
    ids = list(range(1, 13))  # ordinals 0..11
    doomed = checkpoints_to_prune(ids, already_pruned=set(), retention=Retention(keep_last=3, keep_every=4))
    # kept: ordinal 0 (id 1), every 4th (ids 5, 9), newest 3 (ids 10, 11, 12)
    assert doomed == [2, 3, 4, 6, 7, 8]
    protected = checkpoints_to_prune(ids, {2, 3}, Retention(keep_last=3, keep_every=4), protected={7})
    assert protected == [4, 6, 8]
    assert checkpoints_to_prune(ids, set(), Retention(keep_last=1, keep_every=0)) == list(range(2, 12))
