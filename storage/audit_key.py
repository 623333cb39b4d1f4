"""The audit key: a secret kept outside the database that seals each audit event's hash.

Anyone who can write to the database can rewrite the hash chain and recompute every hash after
the change; ``audit verify`` alone cannot tell. With a key, every event also carries
HMAC-SHA256(key, hash), which cannot be recomputed without the key, so ``audit verify
--audit-key FILE`` detects such a rewrite. Every process that writes events (the CLI's
submit and revert, the daemon) must be given the key (``--audit-key`` or
``$METAKE_AUDIT_KEY_FILE``); verification refuses a chain whose events stop carrying MACs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from storage.errors import InvalidInput

AUDIT_KEY_ENV = "METAKE_AUDIT_KEY_FILE"
KEY_BYTES = 32
MIN_KEY_BYTES = 16
SESSION_INFO_KEY = "metake_audit_key"
"""Where a session carries the key (``Session.info``), so that appending events can seal them."""


def event_mac(key: bytes, event_hash: str) -> str:
    """The event's seal: HMAC-SHA256 of its hash under the key, in hex."""
    return hmac.new(key, event_hash.encode(), hashlib.sha256).hexdigest()


def mac_matches(key: bytes, event_hash: str, mac: str) -> bool:
    return hmac.compare_digest(event_mac(key, event_hash), mac)


def load_audit_key(path: Path) -> bytes:
    """The key in ``path`` (its raw bytes; a trailing newline is part of it), checked for length."""
    try:
        key = path.read_bytes()
    except OSError as error:
        raise InvalidInput(f"cannot read the audit key {path}: {error.strerror or error}") from error
    if len(key) < MIN_KEY_BYTES:
        raise InvalidInput(f"the audit key {path} has {len(key)} bytes; it needs at least {MIN_KEY_BYTES}")
    return key


def write_new_audit_key(path: Path) -> None:
    """Create ``path`` with 32 random bytes, readable by its owner only; never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as error:
        raise InvalidInput(f"{path} already exists; an audit key is never overwritten") from error
    except OSError as error:
        raise InvalidInput(f"cannot create {path}: {error.strerror or error}") from error
    with os.fdopen(fd, "wb") as handle:
        handle.write(secrets.token_bytes(KEY_BYTES))
