"""The import contracts in pyproject.toml (``make lint``): kept by the tree, broken by a violation.

Each violation is added to a copy of ``src/graft`` in a temporary folder, so the real tree is
never touched; ``lint-imports`` then reads the copy through ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_every_contract():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("evaluate.py", "import graft.stages.export", "never imports its runners"),
        ("report.py", "import graft.cli", "never imports its runners"),
        ("stages/export.py", "import graft.stages.features", "No stage imports another stage"),
        ("serving/limits.py", "import torch", "graft.serving needs nothing"),
        ("serving/model.py", "import graft.preprocessing", "graft.serving needs nothing"),
        ("errors.py", "import graft.head", "No import cycles"),
    ],
)
def test_a_violation_breaks_its_contract(tmp_path: Path, module: str, line: str, contract: str):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        ROOT / "src" / "graft",
        tmp_path / "src" / "graft",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    assert _lint_imports(tmp_path).returncode == 0  # the copy itself is clean
    target = tmp_path / "src" / "graft" / module
    target.write_text(target.read_text() + f"\n{line}\n")

    result = _lint_imports(tmp_path)

    assert result.returncode != 0
    broken = [text for text in result.stdout.splitlines() if text.endswith(" BROKEN")]
    assert any(contract in text for text in broken), result.stdout
