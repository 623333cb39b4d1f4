"""Fixtures of the CLI tests: ``metake`` run in process on a fresh database of each backend
(tests/store_fixtures.py), the session factory on it, and row counts to show nothing was written."""

from store_fixtures import _isolated_environment, databases, db_url, engine, metake, row_counts, sessions  # noqa: F401
