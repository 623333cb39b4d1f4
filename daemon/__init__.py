"""The daemon: applies the correction queue to the model, batch after batch, for months.

It orchestrates; storage/ does every database read and write (the daemon imports no SQL).

- ``runner``: the Daemon (start-up and recovery; calls the parts below)
- ``held``: the held model (lease guard, live weights and editor state, current checkpoint) and
  ``tentative()``, the one rollback of weights and checkpoint file when anything fails
- ``batches``: one batch from claim to commit, and its retry policy; ``metrics``: what it records
- ``reverting``: performing revert requests; ``health``: retention re-tests and perplexity drift
- ``service``: when to work (one pass for ``metake apply``, wake-ups for ``metake daemon``)
- ``commands``: the click commands daemon, apply, revert, export, demo
- ``settings``: every option, checked before anything is loaded; ``schedule``: interval or cron
- ``workspace``: the editable model (loaded model, editor, unedited layers, drift text) and the
  hyperparameter resolution; ``drift_sample``: the drift check's fixed text
- ``checkpoint_files``: the checkpoint format (file, manifest, names), written atomically
- ``lease``: the lease guard and its heartbeat; ``stopping``: signals
- ``export``: a Hugging Face directory; ``demo`` / ``demo_facts``: the README's first command
- ``logs``: structured log lines and phase timers; ``faults``: named crash points for the recovery tests
"""
