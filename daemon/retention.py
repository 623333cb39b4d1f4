"""Which checkpoint files to delete: all but the newest K, every M-th, the first, and protected ones.

Pruning deletes a file but never its row: the table keeps the history (and the hash) of every
state the model was ever in, and a revert to a pruned checkpoint is refused by name.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from daemon.settings import Retention


def checkpoints_to_prune(
    ids_oldest_first: Sequence[int],
    already_pruned: Collection[int],
    retention: Retention,
    protected: Collection[int] = (),
) -> list[int]:
    """The ids (of one model's checkpoints) whose files should go now.

    The k-th checkpoint (counting the first as 0) is kept when it is among the newest
    ``keep_last``, when ``keep_every`` divides k (so the first is always kept), or when it is
    protected (e.g. named by a pending revert request).
    """
    newest = set(ids_oldest_first[-retention.keep_last :])
    doomed: list[int] = []
    for ordinal, checkpoint_id in enumerate(ids_oldest_first):
        every_mth = ordinal == 0 or (retention.keep_every > 0 and ordinal % retention.keep_every == 0)
        if checkpoint_id in newest or every_mth or checkpoint_id in protected or checkpoint_id in already_pruned:
            continue
        doomed.append(checkpoint_id)
    return doomed
