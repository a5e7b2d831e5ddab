"""The base of graft's own errors: each message says what went wrong and what to do."""


class GraftError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback."""
