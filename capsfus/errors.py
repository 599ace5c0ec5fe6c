"""Errors meant for the user: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """Something the user can fix (a path, a column, a flag). The message says what to do."""

    exit_code = 2
