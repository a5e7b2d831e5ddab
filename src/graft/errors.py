"""The base of graft's own errors: each message says what went wrong and what to do."""


class GraftError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback."""


class MissingInputError(GraftError, FileNotFoundError):
    """A stage's input does not exist yet: an earlier stage has not run.

    The message is ``"<path> not found: <what to do>"``; ``fix`` replaces the default advice.
    """

    def __init__(self, path: object, fix: str | None = None) -> None:
        fix = fix or (
            "run the stage that writes it first "
            "(`dvc repro` or `make run` runs the stages in order)."
        )
        super().__init__(f"{path} not found: {fix}")
