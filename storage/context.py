"""The store as one command invocation sees it: data home, database URL, and a lazy engine.

The ``metake`` CLI puts one StoreContext in ``click.Context.obj``; commands defined in other
modules get it with ``@click.pass_obj`` and open the store through it, so every command gets the
same home and database resolution and the same schema-revision check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from storage.audit_key import AUDIT_KEY_ENV, load_audit_key
from storage.db import display_url, make_engine, read_only, require_current_revision, session_factory, upgrade
from storage.home import DataHome, resolve_db_url, resolve_home


@dataclass
class StoreContext:
    """Resolved locations plus the engine, created on first use and disposed by close()."""

    home: DataHome
    db_url: str
    audit_key: bytes | None = field(default=None, repr=False)
    """Seals the audit events this process appends and checks them in ``audit verify``."""
    _engine: Engine | None = field(default=None, init=False, repr=False)

    @classmethod
    def resolve(
        cls, home: str | None = None, db_url: str | None = None, audit_key_file: str | None = None
    ) -> StoreContext:
        """Apply the precedence rules: explicit value, then environment, then defaults."""
        data_home = resolve_home(home)
        key_file = audit_key_file or os.environ.get(AUDIT_KEY_ENV)
        key = load_audit_key(Path(key_file).expanduser()) if key_file else None
        return cls(home=data_home, db_url=resolve_db_url(db_url, data_home), audit_key=key)

    @property
    def display_url(self) -> str:
        return display_url(self.db_url)

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.db_url)
        return self._engine

    def sessions(self) -> sessionmaker[Session]:
        """Sessions on a database whose schema is current; raises SchemaNotCurrent otherwise."""
        engine = self.engine()
        require_current_revision(engine)
        return session_factory(engine, self.audit_key)

    def read_sessions(self) -> sessionmaker[Session]:
        """Like :meth:`sessions`, for commands that only read: they never wait for a writer."""
        engine = self.engine()
        require_current_revision(engine)
        return session_factory(read_only(engine))

    def initialise(self) -> None:
        """Create the data home and bring the database schema to the newest revision."""
        self.home.create()
        self.upgrade()

    def upgrade(self) -> None:
        """Migrate to the newest revision; works on a database at any older revision or none."""
        self.close()  # a migration must not race this context's own pooled connections
        upgrade(self.db_url)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
