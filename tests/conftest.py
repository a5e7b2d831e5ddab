"""Shared fixtures: tiny projects on the real sample digits with a tiny random-weight timm model."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import pytest
import yaml

from graft.paths import ProjectPaths
from graft.sample_data import write_sample_data

REPO_ROOT = Path(__file__).resolve().parents[1]

# Small enough to run every stage in seconds; the real weights are exercised by the slow tests.
TINY_PARAMS = {
    "data": {"min_images_per_class": 3, "val_fraction": 0.25, "test_fraction": 0.25},
    "backbone": {"name": "test_efficientnet", "weights": "random"},
    "features": {"batch_size": 16},
    "head": {"epochs": 60, "patience": 15},
    "finetune": {"epochs": 2, "batch_size": 8},
    # a random-weight backbone on ~30 test images is not clearly above chance: not gated here
    "evaluate": {"above_chance": False},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first: with `pytest -n 2 --dist worksteal` (make test) one worker starts
    the end-to-end run at once while the other takes the rest, and steals from the first's queue
    when it runs dry. The order is the same in every worker, as xdist requires."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)


@pytest.fixture(autouse=True, scope="session")
def _offline_environment():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def write_params(root: Path, overrides: dict | None = None) -> None:
    """The repository's params.yaml with the tiny settings and ``overrides`` applied."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for changes in (TINY_PARAMS, overrides or {}):
        for section, values in copy.deepcopy(changes).items():
            params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(root: Path, per_class: int = 12, overrides: dict | None = None) -> ProjectPaths:
    """A project folder with params.yaml and ``per_class`` real digits per class in data/."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(root, overrides)
    write_sample_data(root / "data", per_class=per_class)
    return ProjectPaths(root)


@pytest.fixture
def tiny_project(tmp_path: Path) -> ProjectPaths:
    return make_project(tmp_path / "project")


def tree_snapshot(folder: Path) -> dict[bytes, tuple]:
    """Every entry below ``folder``, links not followed: its mode (with its kind), mtime and content
    (a regular file's sha256, a link's target). Never opens anything but regular files."""
    import hashlib
    import stat

    snapshot = {}
    for directory, folders, files in os.walk(os.fsencode(folder)):
        for name in folders + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as file:
                    content = hashlib.file_digest(file, "sha256").hexdigest()
            else:
                content = None
            relative = os.path.relpath(path, os.fsencode(folder))
            snapshot[relative] = (
                stat.S_IFMT(info.st_mode),
                info.st_mode,
                info.st_mtime_ns,
                content,
            )
    return snapshot


@contextlib.contextmanager
def data_unchanged(folder: Path):
    """Assert that what runs inside leaves ``folder`` byte-identical: the same names, contents,
    modes and mtimes, links still links (the rule every fault test checks for data/)."""
    before = tree_snapshot(folder)
    yield
    after = tree_snapshot(folder)
    changed = sorted(
        name.decode(errors="backslashreplace")
        for name in before.keys() | after.keys()
        if before.get(name) != after.get(name)
    )
    assert not changed, f"{folder} changed: {changed[:20]}"
