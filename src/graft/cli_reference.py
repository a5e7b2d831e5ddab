"""The ``--help`` of every ``graft`` sub-command as Markdown, for the documentation site."""

from __future__ import annotations

import click
import typer
import typer.main


def cli_reference_markdown(app: typer.Typer) -> str:
    """One section per sub-command of ``app``: its usage line, what it does, and its options."""
    group = typer.main.get_command(app)
    context = click.Context(group, info_name="graft")
    blocks = _command_block("graft", group, context)
    for name in sorted(group.list_commands(context)):
        command = group.get_command(context, name)
        sub = click.Context(command, info_name=name, parent=context)
        blocks += _command_block(f"graft {name}", command, sub)
    return "\n".join(blocks)


def _command_block(title: str, command: click.Command, context: click.Context) -> list[str]:
    lines = [f"## `{title}`", "", " ".join((command.help or "").split()), ""]
    lines += ["```text", command.get_usage(context)]
    for param in command.get_params(context):
        if param.name in ("help", "install_completion", "show_completion"):
            continue
        record = param.get_help_record(context)
        if record is not None:
            lines.append(f"  {record[0]}\n      {record[1]}")
        elif isinstance(param, click.Argument):
            lines.append(f"  {param.human_readable_name}")
    return [*lines, "```", ""]
