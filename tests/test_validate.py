"""validate: the manifest, splits, quarantine and the refusals a user would run into."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft.config import DataParams
from graft.data.images import ImageRejected, decode_image
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

    # Grow class 3 from 8 to 20 images: images 9-20 of class 3, not written yet.
    extra = [image for image in digit_images(per_class=20) if image[0] == "3"][8:]
    for label, name, png in extra:
        (data_dir / label / name).write_bytes(png)
    after = build_manifest(data_dir, PARAMS).set_index("path")

    assert len(after) == len(before) + 12
    assert after.loc[before["path"], "split"].tolist() == before["split"].tolist()
    assert set(after.loc[[f"3/{name}" for _, name, _ in extra], "split"]) > {"train"}


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
    assert metrics == {
        "images": 81,
        "ok": 80,
        "quarantined": 1,
        "bad": 1,
        "duplicates": 0,
        "classes": 10,
        **summary["splits"],
    }
    assert sum(summary["splits"].values()) == 80
    assert "drift_label_linf" not in metrics and summary["drift"]["baseline"] is False
    docs = tmp_path / "reports" / "validation" / "data_docs" / "index.html"
    assert "graft_manifest" in docs.read_text()


# --- the one image loader: every mode to RGB, EXIF applied, limits checked before decoding ---


def encoded(image: Image.Image, file_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format, **options)
    return buffer.getvalue()


def test_the_loader_normalises_every_mode_to_rgb() -> None:
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    transparent = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    half_grey = Image.new("LA", (10, 10), (0, 128))
    cmyk = Image.new("CMYK", (10, 10), (0, 255, 255, 0))  # pure red in print colours
    sixteen_bit = Image.fromarray(np.full((10, 10), 65535 // 2 + 1, dtype=np.uint16))
    cases = {
        "palette": (encoded(palette, "PNG"), "P", (200, 30, 40)),
        "transparent RGBA on white": (encoded(transparent, "PNG"), "RGBA", (255, 255, 255)),
        "LA half-transparent black on white": (encoded(half_grey, "PNG"), "LA", (127, 127, 127)),
        "CMYK JPEG": (encoded(cmyk, "JPEG", quality=100), "CMYK", (255, 0, 0)),
        "16-bit grey rescaled": (encoded(sixteen_bit, "PNG"), "I;16", (128, 128, 128)),
    }
    for name, (content, mode, pixel) in cases.items():
        decoded = decode_image(content)
        assert decoded.mode == mode, name
        assert decoded.image.mode == "RGB", name
        assert decoded.image.getpixel((5, 5)) == pytest.approx(pixel, abs=2), name


def test_the_loader_applies_the_exif_orientation() -> None:
    wide = Image.new("RGB", (40, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"

    upright = decode_image(encoded(wide, "JPEG", exif=exif)).image

    assert upright.size == (10, 40)


def test_the_pixel_cap_is_checked_before_decoding() -> None:
    """A PNG header claiming 10,000 x 5,000 pixels over a few bytes: refused unread."""
    png = bytearray(encoded(Image.new("L", (8, 8)), "PNG"))
    header = b"IHDR" + struct.pack(">II", 10_000, 5_000) + bytes(png[24:29])
    png[12:29] = header
    png[29:33] = struct.pack(">I", zlib.crc32(header))

    with pytest.raises(ImageRejected) as rejected:
        decode_image(bytes(png), max_pixels=40_000_000)

    assert rejected.value.reason == "too_many_pixels"
    assert "10000x5000 exceeds max_pixels=40000000" in str(rejected.value)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("truncated.png", "half a png", "truncated"),
        ("empty.png", b"", "empty"),
        ("text.jpg", b"not a picture, just text\n", "not_an_image"),
        ("tiny.png", "4x4 png", "too_small"),
        ("huge.png", "64x64 png", "too_many_pixels"),
        ("netpbm.png", "ppm bytes", "unsupported_format"),
        ("phone photo.heic", b"\x00\x00\x00\x18ftypheic", "unsupported_format"),
        ("ünïcödé name with spaces.png", "good png", ""),
    ],
)
def test_each_bad_input_is_quarantined_with_its_reason(
    data_dir: Path, name: str, content: bytes | str, reason: str
) -> None:
    good = (data_dir / "3" / "digit_0003.png").read_bytes()
    made = {
        "half a png": good[: len(good) // 2],
        "4x4 png": encoded(Image.new("L", (4, 4)), "PNG"),
        "64x64 png": encoded(Image.new("L", (64, 64), 9), "PNG"),
        "ppm bytes": encoded(Image.new("RGB", (16, 16)), "PPM"),
        "good png": encoded(Image.new("L", (16, 16), 77), "PNG"),
    }
    (data_dir / "5" / name).write_bytes(made.get(content, content))
    params = DataParams(max_pixels=64 * 63)

    result = validate(data_dir, params)

    row = result.manifest.set_index("path").loc[f"5/{name}"]
    assert (row["status"], row["reason"]) == ("quarantined" if reason else "ok", reason)
    listed = {entry["path"]: entry["reason"] for entry in result.summary["quarantined_files"]}
    assert listed == ({f"5/{name}": reason} if reason else {})


def test_a_symlink_leaving_the_data_folder_is_quarantined_unread(
    tmp_path: Path, data_dir: Path
) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes((data_dir / "0" / "digit_0000.png").read_bytes())
    (data_dir / "2" / "link.png").symlink_to(secret)

    row = validate(data_dir, PARAMS).manifest.set_index("path").loc["2/link.png"]

    assert (row["reason"], row["sha256"]) == ("symlink_outside_data", "")


# --- the Great Expectations suite holds the data-set rules ---


def test_classes_out_of_balance_are_refused_by_the_suite(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_sample_data(data, per_class=30)
    for extra in sorted((data / "4").iterdir())[6:]:
        extra.unlink()

    with pytest.raises(DataValidationError, match="classes out of balance") as error:
        validate(data, DataParams(max_class_imbalance=3))

    assert "max_class_imbalance = 3" in str(error.value)
    assert "class '4' is 5 times smaller than the largest" in str(error.value)
    assert "4/digit_0004.png" in str(error.value)
    assert validate(data, DataParams(max_class_imbalance=5)).summary["expectations"]["success"]


def test_a_class_folder_without_usable_images_is_refused(data_dir: Path) -> None:
    (data_dir / "ghost").mkdir()
    (data_dir / "ghost" / "broken.png").write_bytes(b"")

    with pytest.raises(DataValidationError, match="every class folder has usable images") as err:
        validate(data_dir, PARAMS)

    assert "no usable images in class 'ghost'" in str(err.value)


def test_the_bad_fraction_rule_is_an_expectation_with_an_exact_boundary(data_dir: Path) -> None:
    for index in range(4):  # 4 bad of 84 files: 4.76%
        (data_dir / "0" / f"broken_{index}.png").write_bytes(b"")
    (data_dir / "0" / "copy.png").write_bytes((data_dir / "0" / "digit_0000.png").read_bytes())

    passed = validate(data_dir, DataParams(max_bad_fraction=4 / 85)).summary
    assert (passed["bad"], passed["duplicates"]) == (4, 1)  # duplicates do not count as bad
    with pytest.raises(DataValidationError, match="too many bad files") as error:
        validate(data_dir, DataParams(max_bad_fraction=3 / 85))
    assert "4 of 85 rows fail" in str(error.value) and "0/broken_3.png" in str(error.value)


def test_a_refusal_lists_at_most_20_files(data_dir: Path) -> None:
    for index in range(30):
        (data_dir / "1" / f"bad_{index:02d}.png").write_bytes(b"")

    with pytest.raises(DataValidationError, match="too many bad files") as error:
        validate(data_dir, PARAMS)

    listed = [line for line in str(error.value).splitlines() if "1/bad_" in line]
    assert len(listed) == 20 and listed[0].strip() == "1/bad_00.png"


# --- drift against the previous validated data version ---


def test_drift_without_a_baseline_is_reported_and_never_gated(data_dir: Path) -> None:
    drift = validate(data_dir, DataParams(drift_gate=True)).summary["drift"]

    assert drift == {
        "baseline": False,
        "note": "no baseline: this is the first validated data version",
        "exceeded": [],
        "gate": False,
    }


def test_drift_measures_labels_and_image_statistics(tmp_path: Path, data_dir: Path) -> None:
    baseline = validate(data_dir, PARAMS).profile
    same = validate(data_dir, PARAMS, baseline=baseline).summary["drift"]
    assert same["label_linf"] == 0 and set(same["js"].values()) == {0.0}
    assert same["exceeded"] == []

    for index in range(40):  # class 0 grows with large bright images
        picture = Image.new("L", (64 + index, 48), 230)
        (data_dir / "0" / f"bright_{index}.png").write_bytes(encoded(picture, "PNG"))
    drifted = validate(data_dir, PARAMS, baseline=baseline).summary["drift"]

    # class 0: 8 of 80 images before, 48 of 120 after
    assert drifted["label_linf"] == pytest.approx(48 / 120 - 8 / 80, abs=1e-6)
    assert drifted["label_moved_most"] == "0"
    assert all(0.3 < drifted["js"][name] <= 1 for name in ("width", "height", "brightness"))
    assert any("data.drift_max_label_linf = 0.1" in line for line in drifted["exceeded"])
    assert any("brightness" in line and "drift_max_js" in line for line in drifted["exceeded"])

    with pytest.raises(DataValidationError, match="data drift") as error:
        validate(data_dir, DataParams(drift_gate=True), baseline=baseline)
    assert "drift_max_label_linf" in str(error.value) and "drift_gate" in str(error.value)
    loose = DataParams(drift_gate=True, drift_max_label_linf=0.5, drift_max_js=1.0)
    assert validate(data_dir, loose, baseline=baseline).summary["drift"]["exceeded"] == []


def test_the_stage_keeps_the_last_validated_profile_as_the_drift_baseline(
    tmp_path: Path,
) -> None:
    write_sample_data(tmp_path / "data", per_class=8)
    (tmp_path / "params.yaml").write_text("data:\n  drift_gate: true\n")
    validate_stage(tmp_path)
    profile = tmp_path / "artifacts" / "data_profile.json"
    first = profile.read_text()

    for index in range(30):
        picture = Image.new("L", (100 + index, 100), 250)
        (tmp_path / "data" / "9" / f"new_{index}.png").write_bytes(encoded(picture, "PNG"))
    with pytest.raises(DataValidationError, match="data drift"):
        validate_stage(tmp_path)
    assert profile.read_text() == first  # a refused version never becomes the baseline

    (tmp_path / "params.yaml").write_text("data:\n  drift_gate: false\n")
    validate_stage(tmp_path)
    metrics = json.loads((tmp_path / "metrics" / "validation.json").read_text())
    assert metrics["drift_label_linf"] > 0.1 and metrics["drift_js_brightness"] > 0.2
    assert json.loads(profile.read_text())["images"] == 110
