"""graft's own errors, and the exit status each one gives: the one place the codes are defined.

Every ``graft`` command and ``flows/training.py`` ends with one of these exit statuses, so that
cron, CI and Prefect automations can tell "the gate said no" from "the input needs a fix" from
"it broke":

====  ===========  =====================================================================
code  name         meaning
====  ===========  =====================================================================
0     OK           done: validated, trained, exported, promoted, rolled back, served
1     FAILED       a failure: a crash, a diverged training, a DVC transfer that failed
2     USAGE        the command line itself is wrong (unknown option, missing argument)
3     REFUSED      a gate said no: not blessed, parity, change gates, infra check;
                   nothing was switched
4     BAD_INPUT    the input needs attention: params.yaml, the data folder (including
                   data/ changed but not recorded), a model or image file, a stage run
                   out of order
====  ===========  =====================================================================

A :class:`GraftError` says what went wrong and what to do; the CLI prints its message without a
traceback and exits with its class's ``exit_code``. Raise :class:`InputError` (4) or
:class:`Refused` (3) or a subclass; a plain :class:`GraftError` is a failure (1).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit status of every ``graft`` command and of ``flows/training.py``."""

    OK = 0
    FAILED = 1
    USAGE = 2  # Click's own code for a wrong command line
    REFUSED = 3
    BAD_INPUT = 4


class GraftError(Exception):
    """An error the user can act on; the CLI prints its message without a traceback."""

    exit_code: ExitCode = ExitCode.FAILED


class InputError(GraftError):
    """The input needs attention: params.yaml, the data, a file given on the command line."""

    exit_code = ExitCode.BAD_INPUT


class Refused(GraftError):
    """A gate said no: nothing was exported, switched or deleted."""

    exit_code = ExitCode.REFUSED


class MissingInputError(InputError, FileNotFoundError):
    """A stage's input does not exist yet: an earlier stage has not run.

    The message is ``"<path> not found: <what to do>"``; ``fix`` replaces the default advice.
    """

    def __init__(self, path: object, fix: str | None = None) -> None:
        fix = fix or (
            "run the stage that writes it first "
            "(`dvc repro` or `make run` runs the stages in order)."
        )
        super().__init__(f"{path} not found: {fix}")


def exit_code_of(error: BaseException) -> ExitCode:
    """The exit status a process ends with because of ``error``."""
    return error.exit_code if isinstance(error, GraftError) else ExitCode.FAILED
