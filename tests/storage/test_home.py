"""Where the data home and the database are, by precedence: argument, environment, default."""

from __future__ import annotations

from pathlib import Path

import platformdirs

from storage.db import display_url, sqlite_file
from storage.home import DataHome, resolve_db_url, resolve_home


def test_explicit_home_wins_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("METAKE_HOME", str(tmp_path / "from-env"))
    assert resolve_home(tmp_path / "explicit").root == tmp_path / "explicit"
    assert resolve_home(None).root == tmp_path / "from-env"


def test_default_home_is_the_platform_user_data_dir():
    assert resolve_home(None).root == Path(platformdirs.user_data_dir("metake-daemon")).absolute()


def test_home_layout(tmp_path):
    home = DataHome(tmp_path / "h")
    home.create()
    home.create()  # idempotent
    assert (home.db_path, home.models_dir, home.stats_dir, home.checkpoints_dir) == (
        tmp_path / "h" / "metake.sqlite3",
        tmp_path / "h" / "models",
        tmp_path / "h" / "stats",
        tmp_path / "h" / "checkpoints",
    )
    assert all(p.is_dir() for p in (home.models_dir, home.stats_dir, home.checkpoints_dir))


def test_database_url_precedence(monkeypatch, tmp_path):
    home = DataHome(tmp_path)
    assert resolve_db_url(None, home) == f"sqlite:///{tmp_path}/metake.sqlite3"
    assert sqlite_file(resolve_db_url(None, home)) == tmp_path / "metake.sqlite3"
    monkeypatch.setenv("METAKE_DB_URL", "postgresql+psycopg://u:pw@db/metake")
    assert resolve_db_url(None, home) == "postgresql+psycopg://u:pw@db/metake"
    assert resolve_db_url("sqlite:///elsewhere.db", home) == "sqlite:///elsewhere.db"


def test_display_url_hides_the_password():
    assert display_url("postgresql+psycopg://u:pw@db/metake") == "postgresql+psycopg://u:***@db/metake"
    assert display_url("not a url") == "<unparseable database URL>"
