"""The correction store: schema, queue, audit log and the queries the CLI and daemon ask.

- ``home``: data home layout and database URL resolution
- ``db``: engines, sessions, schema migration and the revision check
- ``models``: the ORM tables; ``types``: the UTC timestamp column type
- ``records``: validating submissions and reading correction files
- ``queue``: submit, claim, release and settle corrections
- ``audit``: the hash-chained audit log
- ``queries`` / ``serialize``: read-only views for people and scripts
- ``context``: what one CLI invocation knows about home and database
"""
