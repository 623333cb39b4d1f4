"""The application's errors for conditions a person can fix, all under :class:`UserError`.

The CLI turns each of them into one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback. Errors raised elsewhere (the daemon's LeaseHeld and DaemonError, a
refused revert) derive from these too, so one ``except UserError`` covers every one of them.
"""


class UserError(Exception):
    """A problem the user can act on; its message is the one line they are shown."""


class StoreError(UserError):
    """A problem with the database itself (reaching it, its schema)."""


class DatabaseUnreachable(StoreError):
    """The database cannot be opened or connected to."""


class SchemaNotCurrent(StoreError):
    """The database schema is not at the revision this code needs."""


class InvalidInput(UserError):
    """A correction, file or option value failed validation; nothing was written."""


class NotFound(UserError):
    """A referenced row does not exist."""


class InvalidTransition(UserError):
    """A correction is not in the status an operation requires."""
