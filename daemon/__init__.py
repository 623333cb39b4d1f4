"""The daemon: applies the correction queue to the model, batch after batch, for months.

- ``runner``: the Daemon (start-up and recovery, one batch, reverts, health checks)
- ``service``: when to work (one pass for ``metake apply``, wake-ups for ``metake daemon``)
- ``commands``: the click commands daemon, apply, revert, export, demo
- ``settings``: every option, checked before anything is loaded; ``schedule``: interval or cron
- ``workspace``: the loaded model and editor; ``measure``: per-correction metrics
- ``checkpoint_files``: atomic safetensors checkpoints; ``lineage``: the checkpoint tree
- ``ledger``: the rows a batch writes; ``retention``: which checkpoint files to delete
- ``lease``: one writer per model; ``reverts``: revert requests; ``stopping``: signals
- ``lifelong`` / ``health``: retention re-tests and perplexity drift, and its text sample
- ``export``: a Hugging Face directory; ``demo`` / ``demo_facts``: the README's first command
- ``logs``: structured log lines; ``faults``: named crash points for the recovery tests
"""
