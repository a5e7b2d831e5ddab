"""Edit the ``backbone`` keys of ``params.yaml`` in place, keeping every other byte.

Used by ``graft select-backbone --apply``. The edited text is parsed and compared with the
original before it replaces the file: an edit that would change anything else is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from graft.config import ParamsError, parse_params
from graft.errors import InputError
from graft.files import write_text_atomic


class ParamsEditError(InputError):
    """params.yaml cannot be edited safely: the user must edit it by hand."""


def apply_backbone(params_path: Path, change: dict[str, Any]) -> bool:
    """Set the ``backbone`` keys of ``change`` in params.yaml, keeping every other byte.

    Each key's line is edited in place (its comment stays); a missing key is added at the end
    of the section. The result is parsed and compared with the original before it replaces
    the file (atomically): any difference outside ``backbone`` refuses the edit.

    Returns:
        Whether the file changed.

    Raises:
        ParamsEditError: if the file cannot be edited safely.
    """
    text = params_path.read_text(encoding="utf-8")
    before = yaml.safe_load(text) or {}
    has_block = any(_SECTION.match(line) for line in text.splitlines())
    if "backbone" in before and not has_block:
        raise ParamsEditError(
            f"{params_path}: the backbone section is not a block of `key: value` lines; set "
            f"backbone.{', backbone.'.join(change)} by hand."
        )
    edited = _edit_backbone_lines(text, change)
    try:
        after = yaml.safe_load(edited)
        parse_params(after, params_path)
    except (yaml.YAMLError, ParamsError) as exc:
        raise ParamsEditError(
            f"editing {params_path} would break it ({exc}); edit it by hand."
        ) from None
    section = before.get("backbone") or {}
    # An absent key that would be null stays absent (same meaning, fewer changed lines).
    wanted = {key: value for key, value in change.items() if value is not None or key in section}
    expected = {**before, "backbone": {**section, **wanted}}
    if after != expected:
        raise ParamsEditError(
            f"{params_path}: the backbone lines could not be edited on their own (unusual "
            f"layout); set backbone.{', backbone.'.join(change)} by hand."
        )
    if edited == text:
        return False
    write_text_atomic(params_path, edited)
    return True


_SECTION = re.compile(r"^backbone:\s*(#.*)?$")
_TOP_LEVEL = re.compile(r"^[^\s#]")


def _edit_backbone_lines(text: str, change: dict[str, Any]) -> str:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _SECTION.match(line.rstrip("\n"))), None)
    if start is None:
        block = "".join(
            f"  {key}: {_scalar(value)}\n" for key, value in change.items() if value is not None
        )
        return text + ("" if text.endswith("\n") or not text else "\n") + "backbone:\n" + block
    end = next((i for i in range(start + 1, len(lines)) if _TOP_LEVEL.match(lines[i])), len(lines))
    last_key, indent = start, "  "
    for key, value in change.items():
        pattern = re.compile(rf"^(\s+){re.escape(key)}:(\s*)([^#]*?)(\s*)(#.*)?$")
        for i in range(start + 1, end):
            body = lines[i].rstrip("\r\n")
            match = pattern.match(body)
            if match:
                lines[i] = _replace_value(match, key, value) + lines[i][len(body) :]
                last_key, indent = max(last_key, i), match.group(1)
                break
        else:
            if value is None:
                continue  # an absent key already means null
            lines.insert(last_key + 1, f"{indent}{key}: {_scalar(value)}\n")
            last_key, end = last_key + 1, end + 1
    return "".join(lines)


def _replace_value(match: re.Match, key: str, value: Any) -> str:
    indent, space, old, gap, comment = match.groups()
    head = f"{indent}{key}:{space or ' '}{_scalar(value)}"
    if not comment:
        return head
    column = len(f"{indent}{key}:{space}{old}{gap}")  # keep the comment where it was if possible
    return head + " " * max(1, column - len(head)) + comment


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n").removesuffix("\n...")
