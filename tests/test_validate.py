"""validate: the manifest, splits, quarantine and the refusals a user would run into."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from graft.config import DataParams
from graft.data.layout import discover_images
from graft.data.manifest import MANIFEST_COLUMNS, build_manifest, read_manifest, write_manifest
from graft.data.splits import assign_split
from graft.sample_data import digit_images, write_sample_data
from graft.stages.validate import main as validate_stage
from graft.validate import DataValidationError, validate

PARAMS = DataParams()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """10 classes of 8 real digit scans each, in data/<class>/<image>."""
    write_sample_data(tmp_path / "data", per_class=8)
    return tmp_path / "data"


def make_split_folders(data: Path, splits: dict[str, int], classes: int = 3) -> Path:
    """data/<split>/<class>/<image> with the given number of digits per class and split."""
    images = digit_images(per_class=sum(splits.values()))
    for class_index in range(classes):
        own = [(name, png) for label, name, png in images if label == str(class_index)]
        start = 0
        for split, count in splits.items():
            for name, png in own[start : start + count]:
                target = data / split / str(class_index) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(png)
            start += count
    return data


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too) with its content hash or link target."""
    state = {}
    for directory, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(directory) / name
            key = path.relative_to(folder).as_posix()
            if path.is_symlink():
                state[key] = f"link:{os.readlink(path)}"
            elif path.is_file():
                state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[key] = "dir"
    return state


def test_manifest_has_the_contract_columns_and_one_row_per_image(data_dir: Path) -> None:
    manifest = validate(data_dir, PARAMS).manifest

    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    on_disk = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*.png"))
    assert manifest["path"].tolist() == on_disk
    assert set(manifest["label"]) == {str(digit) for digit in range(10)}
    assert (manifest["status"] == "ok").all() and (manifest["reason"] == "").all()
    first = manifest.iloc[0]
    assert (first["format"], first["mode"], first["width"], first["height"]) == ("PNG", "L", 8, 8)
    assert first["sha256"] == hashlib.sha256((data_dir / first["path"]).read_bytes()).hexdigest()
    assert first["bytes"] == (data_dir / first["path"]).stat().st_size


def test_splits_are_deterministic_and_adding_an_image_moves_no_other(data_dir: Path) -> None:
    before = build_manifest(data_dir, PARAMS)
    assert before.equals(build_manifest(data_dir, PARAMS))
    assert set(before["split"]) == {"train", "val", "test"}

    extra = digit_images(per_class=9)[-1]  # the 9th image of class 9, not written yet
    (data_dir / extra[0] / extra[1]).write_bytes(extra[2])
    after = build_manifest(data_dir, PARAMS).set_index("path")

    assert len(after) == len(before) + 1
    assert after.loc[before["path"], "split"].tolist() == before["split"].tolist()


def test_assign_split_depends_on_content_and_seed_only() -> None:
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    splits = [assign_split(sha, 42, 0.15, 0.15) for sha in hashes]

    assert splits == [assign_split(sha, 42, 0.15, 0.15) for sha in hashes]
    for split, expected in {"train": 0.70, "val": 0.15, "test": 0.15}.items():
        assert abs(splits.count(split) / len(splits) - expected) < 0.03
    assert splits != [assign_split(sha, 7, 0.15, 0.15) for sha in hashes]


def test_split_folders_are_detected_and_respected(tmp_path: Path) -> None:
    data = make_split_folders(tmp_path / "data", {"train": 6, "val": 2, "test": 2})

    result = validate(data, PARAMS)

    assert result.summary["layout"]["kind"] == "split_folders"
    folder_split = result.manifest["path"].str.split("/").str[0]
    assert (result.manifest["split"] == folder_split).all()
    assert (
        result.manifest["label"].tolist() == result.manifest["path"].str.split("/").str[1].tolist()
    )
    assert result.summary["splits"] == {"train": 18, "val": 6, "test": 6}


def test_without_a_val_folder_val_is_carved_out_of_train(tmp_path: Path) -> None:
    data = make_split_folders(tmp_path / "data", {"train": 10, "test": 2})

    result = validate(data, DataParams(val_fraction=0.3))

    manifest = result.manifest
    from_train = manifest[manifest["path"].str.startswith("train/")]
    assert set(from_train["split"]) == {"train", "val"}
    assert (manifest[manifest["path"].str.startswith("test/")]["split"] == "test").all()
    assert result.summary["layout"]["val"] == "carved out of train by content hash"


def test_bad_files_are_quarantined_with_their_reasons_and_validation_succeeds(
    data_dir: Path,
) -> None:
    good = (data_dir / "3" / "digit_0003.png").read_bytes()
    (data_dir / "3" / "truncated.png").write_bytes(good[: len(good) // 2])
    (data_dir / "4" / "empty.png").write_bytes(b"")
    (data_dir / "5" / "x.jpg").write_text("not a picture, just text\n")
    (data_dir / "5" / "notes.txt").write_text("ignored, but counted\n")
    (data_dir / "5" / ".DS_Store").write_bytes(b"\0hidden")

    result = validate(data_dir, PARAMS)

    rows = result.manifest.set_index("path")
    assert rows.loc["3/truncated.png", ["status", "reason"]].tolist() == [
        "quarantined",
        "truncated",
    ]
    assert rows.loc["4/empty.png", "reason"] == "empty"
    assert rows.loc["5/x.jpg", "reason"] == "not_an_image"
    assert len(result.manifest) == 83 and result.summary["ok"] == 80
    listed = {entry["path"]: entry["reason"] for entry in result.summary["quarantined_files"]}
    assert listed == {
        "3/truncated.png": "truncated",
        "4/empty.png": "empty",
        "5/x.jpg": "not_an_image",
    }
    assert result.summary["ignored_files"]["examples"] == ["5/notes.txt"]


def test_too_many_bad_files_are_refused(data_dir: Path) -> None:
    for index in range(6):
        (data_dir / "0" / f"broken_{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")

    with pytest.raises(DataValidationError, match="too many bad files") as error:
        validate(data_dir, PARAMS)

    assert "0/broken_0.png" in str(error.value) and "max_bad_fraction" in str(error.value)


@pytest.mark.parametrize("exists", [True, False])
def test_a_data_dir_without_images_is_refused(tmp_path: Path, exists: bool) -> None:
    data = tmp_path / "data"
    if exists:
        (data / "cats").mkdir(parents=True)
        (data / "cats" / "readme.md").write_text("no images here")

    with pytest.raises(DataValidationError, match="no images found") as error:
        validate(data, PARAMS)

    assert "graft sample-data" in str(error.value) and str(data) in str(error.value)


def test_a_single_class_is_refused(data_dir: Path) -> None:
    for folder in data_dir.iterdir():
        if folder.name != "7":
            shutil.rmtree(folder)

    with pytest.raises(DataValidationError, match="fewer than 2 classes.*'7'"):
        validate(data_dir, PARAMS)


def test_a_class_under_the_minimum_is_refused_by_name(data_dir: Path) -> None:
    for extra in sorted((data_dir / "6").iterdir())[3:]:
        extra.unlink()

    with pytest.raises(DataValidationError, match="class '6' has 3 usable images") as error:
        validate(data_dir, PARAMS)

    assert "min_images_per_class" in str(error.value)


def test_the_same_image_in_train_and_test_is_refused_as_leakage(tmp_path: Path) -> None:
    data = make_split_folders(tmp_path / "data", {"train": 6, "val": 2, "test": 2})
    leaked = sorted((data / "train" / "1").iterdir())[0]
    shutil.copyfile(leaked, data / "test" / "1" / "copy of a training image.png")

    with pytest.raises(DataValidationError, match="leakage") as error:
        validate(data, PARAMS)

    message = str(error.value)
    assert f"train/1/{leaked.name}" in message
    assert "test/1/copy of a training image.png" in message


def test_copies_within_a_class_are_quarantined_but_across_classes_refused(
    data_dir: Path,
) -> None:
    original = data_dir / "2" / "digit_0002.png"
    shutil.copyfile(original, data_dir / "2" / "later copy.png")

    result = validate(data_dir, PARAMS)
    rows = result.manifest.set_index("path")
    assert rows.loc["2/digit_0002.png", "status"] == "ok"
    assert rows.loc["2/later copy.png", ["status", "reason"]].tolist() == [
        "quarantined",
        "duplicate",
    ]

    shutil.copyfile(original, data_dir / "8" / "mislabelled.png")
    with pytest.raises(DataValidationError, match="appears twice in a split") as error:
        validate(data_dir, PARAMS)
    assert "8/mislabelled.png" in str(error.value)


def test_an_empty_test_split_is_refused(tmp_path: Path) -> None:
    data = make_split_folders(tmp_path / "data", {"train": 8, "val": 2})

    with pytest.raises(DataValidationError, match="empty split: test"):
        validate(data, PARAMS)


def test_split_folders_beside_class_folders_are_refused(data_dir: Path) -> None:
    (data_dir / "test" / "0").mkdir(parents=True)

    with pytest.raises(DataValidationError, match="ambiguous layout"):
        validate(data_dir, PARAMS)


def test_links_out_of_the_data_folder_are_quarantined_and_links_inside_followed(
    tmp_path: Path, data_dir: Path
) -> None:
    outside = tmp_path / "elsewhere.png"
    shutil.copyfile(data_dir / "0" / "digit_0000.png", outside)
    (data_dir / "0" / "outside.png").symlink_to(outside)
    (data_dir / "1" / "shortcut.png").symlink_to(data_dir / "9" / "digit_0009.png")
    (data_dir / "1" / "loop").symlink_to(data_dir / "1", target_is_directory=True)

    rows = build_manifest(data_dir, PARAMS).set_index("path")

    assert rows.loc["0/outside.png", ["status", "reason"]].tolist() == [
        "quarantined",
        "symlink_outside_data",
    ]
    assert rows.loc["1/shortcut.png", "status"] == "ok"
    assert not any(path.startswith("1/loop/") for path in rows.index)


def test_links_into_the_dvc_cache_are_followed(tmp_path: Path, data_dir: Path) -> None:
    cached = tmp_path / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef"
    cached.parent.mkdir(parents=True)
    shutil.copyfile(data_dir / "0" / "digit_0000.png", cached)
    (data_dir / "0" / "digit_0000.png").unlink()
    (data_dir / "0" / "digit_0000.png").symlink_to(cached)

    rows = build_manifest(data_dir, PARAMS).set_index("path")

    assert rows.loc["0/digit_0000.png", ["status", "format"]].tolist() == ["ok", "PNG"]


def test_unusual_names_and_numeric_labels_survive_the_csv(tmp_path: Path) -> None:
    data = tmp_path / "data"
    images = digit_images(per_class=6)
    for label, folder in (("0", "007"), ("1", "NA"), ("2", 'café au lait, "frothy"')):
        for index, (_, _, png) in enumerate(x for x in images if x[0] == label):
            (data / folder).mkdir(parents=True, exist_ok=True)
            (data / folder / f"ünï cödé #{index}.png").write_bytes(png)

    manifest = build_manifest(data, PARAMS)
    write_manifest(manifest, tmp_path / "manifest.csv")
    again = read_manifest(tmp_path / "manifest.csv")

    assert again.equals(manifest)
    assert set(again["label"]) == {"007", "NA", 'café au lait, "frothy"'}
    assert discover_images(data).classes == ("007", "NA", 'café au lait, "frothy"')


def test_the_stage_writes_its_outputs_and_never_touches_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_sample_data(data, per_class=8)
    (data / "1" / "empty.png").write_bytes(b"")
    (tmp_path / "params.yaml").write_text("data:\n  seed: 3\n")
    before = snapshot(data)

    result = validate_stage(tmp_path)

    assert snapshot(data) == before
    manifest = read_manifest(tmp_path / "artifacts" / "manifest.csv")
    assert manifest.equals(result.manifest) and len(manifest) == 81
    summary_text = (tmp_path / "reports" / "validation" / "summary.json").read_text()
    summary = json.loads(summary_text)
    assert summary_text == json.dumps(summary, indent=2, sort_keys=True) + "\n"
    assert summary["quarantined_files"] == [
        {"path": "1/empty.png", "label": "1", "reason": "empty"}
    ]
    assert summary["params"]["seed"] == 3
    metrics = json.loads((tmp_path / "metrics" / "validation.json").read_text())
    assert metrics == {"images": 81, "ok": 80, "quarantined": 1, "classes": 10}
