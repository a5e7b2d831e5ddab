"""Run a command that dies with the process that started it.

    python -m graft.lifeline PARENT_PID COMMAND [ARGS...]

A helper server (the infra check's ``graft serve``) must not outlive a ``graft promote`` that
is killed: it would keep its port and its staged file. On Linux the kernel kills the command
when its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, which survives ``exec``), and the
command replaces this process, so nothing else is left running. Elsewhere this process stays
as a watchdog: it polls the parent and kills the command once the parent is gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def command(parent_pid: int, argv: list[str]) -> list[str]:
    """``argv`` wrapped so that it dies with ``parent_pid`` (give it to ``subprocess.Popen``)."""
    return [sys.executable, "-m", "graft.lifeline", str(parent_pid), *argv]


def main(args: list[str]) -> int:
    parent, argv = int(args[0]), args[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the prctl: no one to serve
            return 1
        os.execv(argv[0], argv)
    return _watch(parent, argv)


def _watch(parent: int, argv: list[str]) -> int:
    child = subprocess.Popen(argv)
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    while child.poll() is None:
        if os.getppid() != parent:
            child.kill()
        time.sleep(0.2)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
