"""Alembic environment for the metake store.

Programmatic callers (storage.db.upgrade, the tests) hand over an open connection in
``config.attributes["connection"]``; the ``alembic`` command line instead connects to
``-x db_url=...``, else ``sqlalchemy.url``, else the URL metake itself would use
($METAKE_DB_URL, else the SQLite file in the data home).
"""

from logging.config import fileConfig
from typing import Any

import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection

from storage.db import make_engine
from storage.home import resolve_db_url, resolve_home
from storage.models import Base
from storage.types import UTCDateTime

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Write UTCDateTime columns as the plain type they store, so revisions import nothing of ours."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return repr(sa.DateTime(timezone=True)).replace("DateTime", "sa.DateTime", 1)
    return False


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        render_item=_render_item,
        **kwargs,
    )


def _command_line_url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("db_url")
        or config.get_main_option("sqlalchemy.url")
        or resolve_db_url(None, resolve_home(None))
    )


def _run_on(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    _configure(url=_command_line_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name)
    engine = make_engine(_command_line_url(), foreign_keys=False)
    try:
        with engine.connect() as fresh_connection:
            _run_on(fresh_connection)
            fresh_connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
