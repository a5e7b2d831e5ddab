"""``python -m graft`` is the ``graft`` command (used where the console script may not be on PATH)."""

from graft.cli import app

app(prog_name="graft")
