"""Hostile files under data/: what a user's folder may hold, and what graft does with it.

Every test runs the real command and ends by checking that data/ is byte-identical (names,
contents, modes, mtimes, links still links): graft never writes, moves or deletes there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from graft.data.manifest import read_manifest
from graft.paths import ProjectPaths
from tests.conftest import data_unchanged, make_project
from tests.test_flow import dvc, run

GRAFT = [sys.executable, "-m", "graft"]
# A hung read must fail the test, not the suite: every command here finishes in seconds.
LIMIT_S = 120


def graft(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*GRAFT, *args, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        env={**os.environ, "COLUMNS": "200"},  # rich tables: no wrapped names
    )


def hostile_entries(data: Path, outside: Path) -> None:
    """A FIFO named like an image, a broken link, a link loop, a link out of data/."""
    os.mkfifo(data / "3" / "x.png")
    (data / "4" / "broken.png").symlink_to(data / "4" / "gone.png")
    (data / "5" / "loop.png").symlink_to(data / "5" / "loop.png")
    outside.write_bytes(b"a private file that is no part of the data set")
    (data / "6" / "escape.png").symlink_to(outside)


@pytest.fixture
def dvc_project(tmp_path: Path) -> ProjectPaths:
    """A project whose data/ is versioned by DVC (`dvc add data`), in a git repository."""
    paths = make_project(tmp_path / "project")
    assert run(paths.root, "git", "init", "--quiet").returncode == 0
    dvc(paths.root, "init", "--quiet")
    dvc(paths.root, "config", "core.analytics", "false")
    dvc(paths.root, "add", "--quiet", "data")
    return paths


def test_validate_quarantines_a_fifo_links_that_lead_nowhere_and_odd_names_without_hanging(
    tmp_path: Path,
):
    paths = make_project(tmp_path / "project")
    hostile_entries(paths.data, tmp_path / "outside.png")
    digit = sorted((paths.data / "7").iterdir())[0]
    shutil.copy(digit, os.path.join(os.fsencode(paths.data / "7"), b"caf\xe9.png"))  # Latin-1

    with data_unchanged(paths.data):
        result = graft(paths.root, "validate")

    assert result.returncode == 0, result.stdout + result.stderr
    reasons = read_manifest(paths.manifest).set_index("path")["reason"]
    assert reasons["3/x.png"] == "not_a_regular_file"
    assert reasons["4/broken.png"] == "broken_symlink"
    assert reasons["5/loop.png"] == "broken_symlink"
    assert reasons["6/escape.png"] == "symlink_outside_data"
    assert reasons["7/caf\\xe9.png"] == "undecodable_name"
    assert "7/caf\\xe9.png" in result.stdout and "Traceback" not in result.stderr


def test_a_file_over_max_file_bytes_is_quarantined_without_being_read(tmp_path: Path):
    paths = make_project(tmp_path / "project", overrides={"data": {"max_file_bytes": 1000}})
    big = paths.data / "2" / "big.png"
    from PIL import Image

    Image.effect_noise((64, 64), 64).save(big)  # noise: a PNG of some kilobytes
    assert big.stat().st_size > 1000

    with data_unchanged(paths.data):
        result = graft(paths.root, "validate")

    assert result.returncode == 0, result.stdout + result.stderr
    row = read_manifest(paths.manifest).set_index("path").loc["2/big.png"]
    assert row["reason"] == "too_large" and row["bytes"] == big.stat().st_size
    assert row["sha256"] == ""  # never read: not even hashed


def test_check_data_names_what_dvc_cannot_version_before_dvc_runs(
    dvc_project: ProjectPaths, tmp_path: Path
):
    hostile_entries(dvc_project.data, tmp_path / "outside.png")
    with data_unchanged(dvc_project.data):
        result = graft(dvc_project.root, "check-data")
    assert result.returncode == 4, result.stdout + result.stderr
    for line in (
        "3/x.png: not_a_regular_file",
        "4/broken.png: broken_symlink",
        "5/loop.png: symlink_loop",
        "6/escape.png: symlink_outside_data",
    ):
        assert line in result.stderr
    assert "Traceback" not in result.stderr
    cache = dvc_project.root / ".dvc" / "cache"
    outside = (tmp_path / "outside.png").read_bytes()
    assert not any(p.read_bytes() == outside for p in cache.rglob("*") if p.is_file())


def test_check_data_names_a_relabel_an_addition_a_deletion_and_records_only_when_asked(
    dvc_project: ProjectPaths,
):
    data = dvc_project.data
    (data / "1" / "digit_0001.png").rename(data / "2" / "digit_0001.png")  # a relabel
    shutil.copy(data / "3" / "digit_0003.png", data / "3" / "new.png")
    (data / "4" / "digit_0004.png").unlink()
    recorded = dvc_project.data_dvc.read_text()

    with data_unchanged(data):
        refused = graft(dvc_project.root, "check-data")
        assert refused.returncode == 4, refused.stdout + refused.stderr
        message = " ".join(refused.stderr.split())
        assert "moved: data/1/digit_0001.png -> data/2/digit_0001.png" in message
        assert "added: data/3/new.png" in message and "deleted: data/4/digit_0004.png" in message
        assert "`graft check-data --record`" in message
        assert dvc_project.data_dvc.read_text() == recorded

        recording = graft(dvc_project.root, "check-data", "--record")
        assert recording.returncode == 0, recording.stdout + recording.stderr

    assert dvc_project.data_dvc.read_text() != recorded
    assert "data/: unchanged" in graft(dvc_project.root, "check-data").stdout
    status = dvc(dvc_project.root, "status", "data.dvc").stdout
    assert "up to date" in status


def test_check_data_record_versions_an_untracked_data_folder_without_touching_it(
    tmp_path: Path,
):
    paths = make_project(tmp_path / "project")
    assert run(paths.root, "git", "init", "--quiet").returncode == 0
    dvc(paths.root, "init", "--quiet")
    dvc(paths.root, "config", "core.analytics", "false")
    (paths.data / "2" / "link.png").symlink_to(sorted((paths.data / "2").iterdir())[0])

    with data_unchanged(paths.data):
        assert "data/: untracked" in graft(paths.root, "check-data").stdout
        recording = graft(paths.root, "check-data", "--record")
        assert recording.returncode == 0, recording.stdout + recording.stderr

    assert "data/: recorded" in recording.stdout and paths.data_dvc.is_file()
    assert (paths.data / "2" / "link.png").is_symlink()  # `dvc add data` would copy it
    assert "up to date" in dvc(paths.root, "status", "data.dvc").stdout


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda text: text.replace("  lr: 0.01\n", "  lr: .inf\n", 1), "key 'head.lr'"),
        (lambda text: text.replace("  lr: 0.01\n", "  lr: .nan\n", 1), "key 'head.lr'"),
        (
            lambda text: text.replace("  batch_size: 16\n", "  batch_size: 1600000\n", 1),
            "key 'features.batch_size'",
        ),
        (
            lambda text: text.replace("  lr: 0.01\n", "  lr: 0.01\n  lr: 0.5\n", 1),
            "duplicate key 'lr'",
        ),
        (
            lambda text: text.replace("head:", "head:\n  hidden: 1\nhead:", 1),
            "duplicate key 'head'",
        ),
    ],
    ids=["inf", "nan", "huge-batch", "duplicate-key", "duplicate-section"],
)
def test_a_hostile_params_file_stops_every_command_naming_the_key(tmp_path: Path, edit, said):
    paths = make_project(tmp_path / "project", per_class=6)
    params = paths.params.read_text()
    edited = edit(params)
    assert edited != params
    paths.params.write_text(edited)
    with data_unchanged(paths.data):
        result = graft(paths.root, "validate")
    assert result.returncode == 4, result.stdout + result.stderr
    assert said in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def test_a_params_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path):
    paths = make_project(tmp_path / "project", per_class=6)
    paths.params.write_bytes(b"# caf\xe9 (Latin-1)\n" + paths.params.read_bytes())
    result = graft(paths.root, "validate")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "not UTF-8" in result.stderr and "0xe9" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_16_bit_big_endian_tiff_is_read_like_its_little_endian_twin(tmp_path: Path):
    import numpy as np
    from PIL import Image

    from graft.data.images import decode_image

    samples = np.linspace(0, 65535, 24 * 16).astype(np.uint16).reshape(16, 24)
    decoded = {}
    for mode, dtype in (("I;16B", ">u2"), ("I;16", "<u2")):
        path = tmp_path / f"{mode}.tif"
        Image.frombytes(mode, (24, 16), samples.astype(dtype).tobytes()).save(path)
        decoded[mode] = decode_image(path)
    assert decoded["I;16B"].mode == "I;16B" and decoded["I;16B"].format == "TIFF"
    big, little = (np.asarray(decoded[mode].image) for mode in ("I;16B", "I;16"))
    assert np.array_equal(big, little)
    assert np.array_equal(big[..., 0], (samples >> 8).astype(np.uint8))  # full range kept


def test_dvc_own_links_into_its_cache_are_versioned_data_not_a_problem(dvc_project):
    dvc(dvc_project.root, "config", "cache.type", "symlink")
    dvc(dvc_project.root, "checkout", "--relink", "--quiet", "data.dvc")  # the user's own choice
    assert (dvc_project.data / "0" / "digit_0000.png").is_symlink()
    with data_unchanged(dvc_project.data):
        result = graft(dvc_project.root, "check-data")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data/: unchanged" in result.stdout
