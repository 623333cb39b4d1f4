"""The correction store: the only code that touches the database (the daemon calls named functions).

- ``home``: data home layout and database URL resolution
- ``db``: engines, sessions, schema migration and the revision check
- ``models``: the ORM tables; ``types``: the UTC timestamp column type
- ``intake``: validating submissions and reading correction files (plain and CounterFact records)
- ``queue``: submit, claim, release, lock and settle corrections
- ``checkpoints``: the checkpoint tree, adding checkpoints, retention, choosing one to export
- ``edits``: edit rows and their metrics; ``leases``: one writer per model; ``reverts``: revert requests
- ``audit``: the hash-chained audit log
- ``queries`` / ``serialize``: read-only views for people, scripts, the demo and the health checks
- ``context``: what one CLI invocation knows about home and database
- ``errors``: UserError, the base of every error shown as one line
"""
