"""``python -m graft`` runs the ``graft`` command, also where its script is not on PATH."""

from graft.cli import app

app(prog_name="graft")
