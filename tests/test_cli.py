"""The `graft` command as a user meets it: clear errors without tracebacks, the sample data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from graft.cli import app
from graft.errors import ExitCode
from graft.sample_data import write_sample_data
from tests.conftest import make_project, write_params

runner = CliRunner()


def graft(*args: str):
    return runner.invoke(app, list(args))


def test_empty_data_folder_is_a_clear_error(tmp_path: Path):
    write_params(tmp_path)
    (tmp_path / "data").mkdir()
    result = graft("validate", "--root", str(tmp_path))
    assert result.exit_code == ExitCode.BAD_INPUT == 4
    assert "no images" in result.output and "graft sample-data" in result.output
    assert "Traceback" not in result.output


def test_a_single_class_is_a_clear_error(tmp_path: Path):
    paths = make_project(tmp_path, per_class=6)
    for folder in paths.data.iterdir():
        if folder.name != "7":
            for image in folder.iterdir():
                image.unlink()
            folder.rmdir()
    result = graft("validate", "--root", str(tmp_path))
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "class" in result.output and "'7'" in result.output
    assert "Traceback" not in result.output


def test_unknown_params_key_stops_a_stage_naming_the_key(tmp_path: Path):
    make_project(tmp_path, per_class=6)
    params = tmp_path / "params.yaml"
    params.write_text(params.read_text().replace("finetune:", "finetune:\n  epocs: 3", 1))
    result = graft("validate", "--root", str(tmp_path))
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "unknown key 'finetune.epocs'" in result.output


def test_corrupt_image_is_quarantined_and_reported_while_validation_succeeds(tmp_path: Path):
    paths = make_project(tmp_path, per_class=12)
    victim = sorted((paths.data / "2").iterdir())[0]
    truncated = tmp_path / "corrupt.png"
    truncated.write_bytes(victim.read_bytes()[:40])
    (paths.data / "2" / "corrupt.png").write_bytes(truncated.read_bytes())
    result = graft("validate", "--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "1 quarantined" in result.output and "corrupt.png" in result.output
    manifest = paths.manifest.read_text()
    assert "2/corrupt.png" in manifest and "quarantined" in manifest


def test_sample_data_is_the_digits_byte_for_byte_reproducible(tmp_path: Path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert graft("sample-data", "--dest", str(first)).exit_code == 0
    write_sample_data(second)

    def digest(folder: Path) -> dict[str, str]:
        return {
            p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in folder.rglob("*.png")
        }

    assert len(digest(first)) == 1797
    assert sorted(p.name for p in first.iterdir()) == [str(d) for d in range(10)]
    assert digest(first) == digest(second)


def test_sample_data_never_writes_into_a_folder_with_files(tmp_path: Path):
    data = tmp_path / "data"
    (data / "mine").mkdir(parents=True)
    (data / "mine" / "photo.jpg").write_bytes(b"precious")
    result = graft("sample-data", "--dest", str(data))
    assert result.exit_code == ExitCode.BAD_INPUT and "not empty" in result.output
    assert graft("sample-data", "--dest", str(data), "--if-empty").exit_code == 0
    assert [p.name for p in data.rglob("*") if p.is_file()] == ["photo.jpg"]
    assert (data / "mine" / "photo.jpg").read_bytes() == b"precious"


@pytest.mark.parametrize("command", ["features", "train-head", "finetune", "evaluate", "export"])
def test_stages_run_out_of_order_say_what_is_missing(tmp_path: Path, command: str):
    write_params(tmp_path)
    result = graft(command, "--root", str(tmp_path))
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "not found" in result.output and "Traceback" not in result.output


def test_version_is_the_installed_distribution_version():
    from importlib.metadata import version

    result = graft("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"graft {version('graft')}"
    import graft as package  # the ONNX metadata records this one: the two must agree

    assert package.__version__ == version("graft")


@pytest.mark.parametrize(
    ("command", "missing", "advice"),
    [
        ("promote", "models/blessing.json", "run `dvc repro export` first."),
        ("rollback", "models/production/versions.json", "nothing has been promoted yet"),
    ],
)
def test_promote_and_rollback_without_an_export_say_it_once(
    tmp_path: Path, command: str, missing: str, advice: str
):
    write_params(tmp_path)
    result = graft(command, "--root", str(tmp_path))
    assert result.exit_code == ExitCode.BAD_INPUT and "Traceback" not in result.output
    message = " ".join(result.output.split())  # the terminal may wrap the line
    assert message.startswith(f"graft {command}: {tmp_path / missing} not found: {advice}")
    # one sentence of advice, not the default advice appended to a custom one
    assert message.count("not found") == 1 and "is missing" not in message
    assert "run the stage that writes it first" not in message


def test_a_refusal_a_bad_input_a_failure_and_a_wrong_command_line_exit_differently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    paths = make_project(tmp_path, per_class=6)
    paths.blessing.parent.mkdir(parents=True)
    paths.blessing.write_text(
        '{"passed": false, "candidate": "head", "reasons": ["accuracy 0.5 below the minimum"]}'
    )
    refused = graft("export", "--root", str(tmp_path))
    assert refused.exit_code == ExitCode.REFUSED == 3, refused.output
    assert "not blessed" in refused.output and "Traceback" not in refused.output

    from graft.head import HeadError
    from graft.stages import train_head

    def diverges(root):
        raise HeadError("The head's training loss became nan in epoch 3: lower head.lr.")

    monkeypatch.setattr(train_head, "main", diverges)
    failed = graft("train-head", "--root", str(tmp_path))
    assert failed.exit_code == ExitCode.FAILED == 1 and "loss became nan" in failed.output

    assert graft("validate", "--no-such-option").exit_code == ExitCode.USAGE == 2
    assert "Exit status: 0 done, 1 failure" in graft("--help").output
