"""Small file helpers: every write goes to a temporary name first, then is renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from graft.errors import MissingInputError


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_json(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """Parse a JSON file another stage wrote.

    Raises:
        MissingInputError: if the file does not exist yet.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingInputError(path) from None
