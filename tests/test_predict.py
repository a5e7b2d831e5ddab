"""``graft predict`` as a user runs it: folders in, a CSV or JSON table out, bad files reported.

Needs only the ``serve`` extra (committed fixture models): ``make test-serve`` runs it too.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.serving.server import (
    DIGITS_MODEL,
    GRAFT,
    IMAGES,
    NAN_MODEL,
    direct_probabilities,
    sample_images,
)

pytestmark = pytest.mark.timeout(300)


def graft_predict(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*GRAFT, "predict", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The sample digits, plus in a sub-folder the kinds of bad files real folders hold."""
    images = tmp_path / "images"
    shutil.copytree(IMAGES, images)
    odd = images / "odd" / "deeper"
    odd.mkdir(parents=True)
    digit = sample_images()[0].read_bytes()
    (odd / "truncated.png").write_bytes(digit[: len(digit) // 2])
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "text.png").write_bytes(b"not an image")
    (odd / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (odd / "notes.txt").write_text("not listed: not an image extension")
    (odd / ".hidden.png").write_bytes(digit)  # hidden files are skipped
    return images


def test_a_folder_becomes_one_json_row_per_image_with_errors_for_bad_files(folder, tmp_path):
    output = tmp_path / "out" / "predictions.json"
    result = graft_predict(DIGITS_MODEL, folder, "--output", output, "--top-k", "3")
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())
    by_name = {Path(row["path"]).name: row for row in rows}
    assert len(rows) == 20 + 4 and "notes.txt" not in by_name and ".hidden.png" not in by_name
    errors = {name: row["error"]["reason"] for name, row in by_name.items() if row["error"]}
    assert errors == {
        "truncated.png": "truncated",
        "empty.jpg": "empty",
        "text.png": "not_an_image",
        "phone.heic": "unsupported_format",
    }
    for row in rows:
        if row["error"]:
            assert "label" not in row and row["error"]["detail"]
            continue
        labels, expected = direct_probabilities(DIGITS_MODEL, Path(row["path"]))
        assert [entry["label"] for entry in row["top_k"]] == [
            labels[i] for i in np.argsort(-expected, kind="stable")[:3]
        ]
        np.testing.assert_allclose(
            [entry["probability"] for entry in row["top_k"]], np.sort(expected)[::-1][:3], atol=1e-6
        )
    assert "predict: 24 files, 20 predicted, 4 errors" in result.stderr
    assert "empty: 1, not_an_image: 1, truncated: 1, unsupported_format: 1" in result.stderr
    assert "predict" in result.stderr and "24/24" in result.stderr  # the progress bar


def test_csv_output_holds_the_same_answers_as_json(folder, tmp_path):
    as_json, as_csv = tmp_path / "p.json", tmp_path / "p.csv"
    assert graft_predict(DIGITS_MODEL, folder, "-o", as_json, "--batch-size", "7").returncode == 0
    assert graft_predict(DIGITS_MODEL, folder, "-o", as_csv).returncode == 0
    rows = list(csv.DictReader(as_csv.open()))
    header = as_csv.read_text().splitlines()[0]
    assert header == "path,error,label,probability," + ",".join(
        f"label_{k},probability_{k}" for k in range(1, 6)
    )
    for csv_row, json_row in zip(rows, json.loads(as_json.read_text()), strict=True):
        assert csv_row["path"] == json_row["path"]
        if json_row["error"]:
            assert csv_row["error"] == json_row["error"]["reason"] and csv_row["label"] == ""
            continue
        assert csv_row["error"] == "" and csv_row["label"] == json_row["label"]
        for rank, entry in enumerate(json_row["top_k"], start=1):
            assert csv_row[f"label_{rank}"] == entry["label"]
            assert float(csv_row[f"probability_{rank}"]) == entry["probability"]  # exact


def test_without_output_the_csv_goes_to_standard_output_and_named_files_are_always_tried(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    image = sample_images()[5]
    result = graft_predict(DIGITS_MODEL, image, notes, "--top-k", "1")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["path"] for row in rows] == [str(image), str(notes)]
    assert rows[0]["label"] in {str(d) for d in range(10)} and rows[0]["error"] == ""
    assert rows[1]["error"] == "not_an_image"
    assert "label_2" not in rows[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("{tmp}/missing",), "missing does not exist"),
        (("{images}", "-o", "{tmp}/out.txt"), "must end in .csv or .json"),
        (("{images}", "-o", "{tmp}"), "is a folder: give the file to write"),
    ],
)
def test_unusable_arguments_stop_with_a_message_naming_them(tmp_path, args, message):
    args = [a.format(tmp=tmp_path, images=IMAGES) for a in args]
    result = graft_predict(DIGITS_MODEL, *args)
    assert result.returncode == 4 and message in result.stderr  # ExitCode.BAD_INPUT
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.txt").exists()


def test_a_model_that_cannot_be_used_stops_with_a_message(tmp_path):
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x08\x01garbage")
    for model, message, exit_code in (  # ExitCode: BAD_INPUT for the file given, FAILED
        (tmp_path / "nope.onnx", "not found", 4),
        (not_onnx, "not a usable ONNX model", 4),
        (NAN_MODEL, "non-finite logits", 1),
    ):
        result = graft_predict(model, IMAGES, "-o", tmp_path / "p.json")
        assert result.returncode == exit_code, model
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "p.json").exists()


def png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, "PNG")
    return buffer.getvalue()


def test_hostile_entries_in_a_folder_are_rows_with_their_reason_and_the_rest_is_predicted(
    tmp_path,
):
    """Lines that would resize to gigabytes, links to nothing, a loop of links and a FIFO named
    like an image: each is a row with its reason; nothing hangs, nothing is skipped."""
    folder = tmp_path / "images"
    shutil.copytree(IMAGES / "3", folder)
    (folder / "line-1000x1.png").write_bytes(png_of_size(1000, 1))  # 75 bytes
    (folder / "line-1x20000.png").write_bytes(png_of_size(1, 20000))
    (folder / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    os.mkfifo(folder / "fifo.png")
    output = tmp_path / "p.json"

    result = graft_predict(DIGITS_MODEL, folder, "-o", output)
    assert result.returncode == 0, result.stderr
    rows = {Path(row["path"]).name: row for row in json.loads(output.read_text())}
    reasons = {name: row["error"]["reason"] for name, row in rows.items() if row["error"]}
    assert reasons == {
        "line-1000x1.png": "extreme_aspect_ratio",
        "line-1x20000.png": "extreme_aspect_ratio",
        "broken.png": "broken_symlink",
        "loop.png": "broken_symlink",
        "fifo.png": "not_a_regular_file",
    }
    assert "1000x1 is 1000:1" in rows["line-1000x1.png"]["error"]["detail"]
    predicted = [row for row in rows.values() if row["error"] is None]
    assert len(predicted) == len(list((IMAGES / "3").iterdir())) > 0


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_file_name_that_is_not_utf8_is_written_as_its_own_bytes(tmp_path, suffix):
    folder = tmp_path / "images"
    folder.mkdir()
    name = b"caf\xe9-\xff.png"  # Latin-1, as old cameras and Windows shares name files
    (Path(os.fsdecode(folder)) / os.fsdecode(name)).write_bytes(sample_images()[0].read_bytes())
    output = tmp_path / f"p{suffix}"
    result = graft_predict(DIGITS_MODEL, folder, "-o", output)
    assert result.returncode == 0, result.stderr
    if suffix == ".csv":
        (row,) = list(
            csv.DictReader(io.StringIO(output.read_bytes().decode(errors="surrogateescape")))
        )
    else:
        (row,) = json.loads(output.read_text())
    assert os.fsencode(row["path"]) == os.fsencode(folder) + b"/" + name
    assert row["error"] in ("", None) and row["label"] in {str(d) for d in range(10)}
    stdout = subprocess.run(
        [*GRAFT, "predict", str(DIGITS_MODEL), str(folder)], capture_output=True, timeout=120
    )
    assert stdout.returncode == 0 and b"/" + name + b"," in stdout.stdout
