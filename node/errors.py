"""Errors a user caused or can fix: the CLI prints them as one line and exits non-zero."""
from __future__ import annotations

import sqlite3

from hypersdk.protocol.errors import IntegrityError, ProtocolError


class UserError(Exception):
    exit_code = 1


class UsageError(UserError):
    exit_code = 2


def describe(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an error an operation raised: what the
    CLI prints and the daemon sends back (README "Usage" lists the codes)."""
    if isinstance(exc, UserError):
        return exc.exit_code, str(exc)
    if isinstance(exc, IntegrityError):
        return 3, f"{exc} (run `hypersdk verify` for the full damage report)"
    if isinstance(exc, ProtocolError):
        return 3, f"malformed data: {exc}"
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        return 1, "no space left in the data dir"
    if isinstance(exc, sqlite3.DatabaseError):
        return 1, f"store index: {exc}"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return 1, f"{where}{exc.strerror or exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    return 1, f"{type(exc).__name__}: {exc}"
