"""Where metake keeps its files, and which database it talks to.

One data home holds the SQLite database, cached models, statistics and checkpoints, so that a
whole installation can be moved, backed up or wiped as one directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from storage.errors import InvalidInput

HOME_ENV = "METAKE_HOME"
DB_URL_ENV = "METAKE_DB_URL"
APP_NAME = "metake-daemon"
DB_FILENAME = "metake.sqlite3"


@dataclass(frozen=True)
class DataHome:
    """The data home directory and the fixed layout inside it."""

    root: Path

    @property
    def db_path(self) -> Path:
        return self.root / DB_FILENAME

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def create(self) -> None:
        """Make the home and its subdirectories; safe to call again."""
        for path in (self.root, self.models_dir, self.stats_dir, self.checkpoints_dir):
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as error:  # a file in the way, a read-only filesystem, no permission
                raise InvalidInput(f"cannot create the data home folder {path}: {error.strerror or error}") from error

    def sqlite_url(self) -> str:
        return f"sqlite:///{self.db_path}"


def resolve_home(explicit: str | os.PathLike[str] | None = None) -> DataHome:
    """Pick the data home: the explicit argument, else $METAKE_HOME, else the user data dir."""
    chosen = explicit or os.environ.get(HOME_ENV) or platformdirs.user_data_dir(APP_NAME)
    return DataHome(Path(chosen).expanduser().absolute())


def resolve_db_url(explicit: str | None, home: DataHome) -> str:
    """Pick the database: the explicit URL, else $METAKE_DB_URL, else the SQLite file in the home."""
    return explicit or os.environ.get(DB_URL_ENV) or home.sqlite_url()
