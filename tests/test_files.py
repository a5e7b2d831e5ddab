"""Writes through a temporary file: a failure never half-replaces what was there."""

from pathlib import Path

import pytest

from graft.files import replacing, write_json


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "out" / "model.bin"
    write_json(target, {"good": True})
    with pytest.raises(RuntimeError), replacing(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "good": true\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]


def test_a_successful_write_replaces_the_file(tmp_path: Path):
    target = tmp_path / "model.bin"
    target.write_text("old")
    with replacing(target) as temporary:
        temporary.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
