"""Errors a user caused or can fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    exit_code = 1


class UsageError(UserError):
    exit_code = 2
