"""Exceptions the store raises for conditions a person can fix.

The CLI turns each of them into one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class StoreError(Exception):
    """A problem with input or with the database that the user can act on."""


class DatabaseUnreachable(StoreError):
    """The database cannot be opened or connected to."""


class SchemaNotCurrent(StoreError):
    """The database schema is not at the revision this code needs."""


class InvalidInput(StoreError):
    """A correction, file or option value failed validation; nothing was written."""


class NotFound(StoreError):
    """A referenced row does not exist."""


class InvalidTransition(StoreError):
    """A correction is not in the status an operation requires."""
