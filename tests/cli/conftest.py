"""Fixtures of the CLI tests: the shared database fixtures (tests/store_fixtures.py)."""

from store_fixtures import (  # noqa: F401 - fixtures
    _isolated_environment,
    backend,
    databases,
    db_url,
    empty_db_url,
    engine,
    metake,
    row_counts,
    sessions,
)
