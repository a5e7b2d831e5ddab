"""The ``--help`` of every ``graft`` sub-command as Markdown, for the documentation site."""

from __future__ import annotations

import click
import typer.main

from graft.cli import app


def cli_reference_markdown() -> str:
    """One section per sub-command: its usage line, what it does, and its options."""
    group = typer.main.get_command(app)
    context = click.Context(group, info_name="graft")
    blocks = ["## `graft`", "", "```text", group.get_usage(context), "```", ""]
    for name in sorted(group.list_commands(context)):
        command = group.get_command(context, name)
        sub = click.Context(command, info_name=name, parent=context)
        blocks += [f"## `graft {name}`", "", " ".join((command.help or "").split()), ""]
        blocks += ["```text", command.get_usage(sub)]
        for param in command.get_params(sub):
            if param.name == "help":
                continue
            record = param.get_help_record(sub)
            if record is not None:
                blocks.append(f"  {record[0]}\n      {record[1]}")
            elif isinstance(param, click.Argument):
                blocks.append(f"  {param.human_readable_name}")
        blocks += ["```", ""]
    return "\n".join(blocks)
