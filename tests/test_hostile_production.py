"""Production under attack: concurrent promotions, killed promotions, a damaged champion, file
modes another user cannot read, kept versions and rollback, and the images that cost gigabytes.

Promotion mechanics do not depend on how a model was trained, so these projects "export" the
committed fixture model (tests/fixtures/serving/digits.onnx, ten digit labels) and variants of
it (another metadata value: another sha256, the same answers) instead of running every stage;
tests/test_promotion.py runs the real pipeline. After each test the project's data/ must be
byte-identical (names, contents, modes, mtimes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from graft.config import load_params
from graft.errors import ExitCode
from graft.files import file_sha256, read_json
from graft.paths import ProjectPaths
from graft.promotion import (
    ChampionUnreadable,
    RollbackRefused,
    promote,
    rollback,
)
from graft.stages import validate
from tests.conftest import data_unchanged, make_project, write_params
from tests.fixtures.serving.server import DIGITS_MODEL, free_port, running_server

pytestmark = pytest.mark.timeout(600)

GRAFT_MODULE = [sys.executable, "-m", "graft"]


def variant(index: int) -> bytes:
    """The digits fixture with one more metadata entry: another file, the same model."""
    import onnx

    model = onnx.load(str(DIGITS_MODEL))
    entry = model.metadata_props.add()
    entry.key, entry.value = "variant", str(index)
    return model.SerializeToString()


def export_as(paths: ProjectPaths, model: bytes) -> str:
    """Put ``model`` where the export stage writes, blessed: what `graft promote` takes."""
    paths.onnx_model.parent.mkdir(parents=True, exist_ok=True)
    paths.onnx_model.write_bytes(model)
    paths.blessing.write_text(json.dumps({"passed": True, "reasons": []}))
    paths.model_card.write_text(f"# model card of {file_sha256(paths.onnx_model)[:12]}\n")
    paths.metrics.mkdir(parents=True, exist_ok=True)
    export = {
        "model_sha256": file_sha256(paths.onnx_model),
        "blessing_sha256": file_sha256(paths.blessing),
    }
    (paths.metrics / "export.json").write_text(json.dumps(export))
    return export["model_sha256"]


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> ProjectPaths:
    paths = make_project(tmp_path_factory.mktemp("validated") / "project")
    validate.main(paths.root)
    return paths


@pytest.fixture
def project(validated, tmp_path) -> ProjectPaths:
    """A validated tiny project; its data/ is checked unchanged when the test ends."""
    paths = ProjectPaths(shutil.copytree(validated.root, tmp_path / "project", symlinks=True))
    with data_unchanged(paths.data):
        yield paths


def production(paths: ProjectPaths) -> Path:
    return paths.root / "models" / "production"


def _promote(paths: ProjectPaths, **kwargs):
    return promote(paths.root, load_params(paths.params), **kwargs)


def _rollback(paths: ProjectPaths, to: str | None = None) -> str:
    return rollback(paths.root, load_params(paths.params), to)


def served_sha256(paths: ProjectPaths) -> str:
    return file_sha256(production(paths) / "model.onnx")


def graft_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*GRAFT_MODULE, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def wait_for(condition, timeout_s: float = 120, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- item 3: modes, and a server running as another user ---------------------------------------


def as_another_user(command: list[str]) -> list[str]:
    """``command`` run as another user (nobody) when the tests run as root; otherwise the test
    user itself is 'another user' to a file whose mode keeps it out."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without util-linux's setpriv: cannot become another user")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]


@pytest.fixture
def shared_project(validated) -> ProjectPaths:
    """A project another user can reach (tmp_path's parents are private to the test user)."""
    folder = Path(tempfile.mkdtemp(prefix="graft-shared-"))
    folder.chmod(0o755)
    paths = ProjectPaths(shutil.copytree(validated.root, folder / "project"))
    with data_unchanged(paths.data):
        yield paths
    shutil.rmtree(folder, ignore_errors=True)


def test_promoted_files_have_the_umask_mode_and_another_user_serves_them(shared_project):
    paths = shared_project
    export_as(paths, variant(1))
    old_umask = os.umask(0o022)
    try:
        record = _promote(paths)
    finally:
        os.umask(old_umask)
    written = [
        path for path in production(paths).rglob("*") if path.is_file() and path.name != ".lock"
    ]
    names = {path.relative_to(production(paths)).as_posix() for path in written}
    assert {"model.onnx", "promotion.json", "model_card.md", "versions.json"} <= names
    assert f"versions/{record.version}/model.onnx" in names
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {oct(0o644)}

    # The documented serving container: another uid, the folder mounted read-only.
    port = free_port()
    server = subprocess.Popen(
        as_another_user(
            [*GRAFT_MODULE, "serve", str(production(paths) / "model.onnx"), "--port", str(port)]
        ),
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _ready(port) or server.poll() is not None, 120, "the server")
        assert server.poll() is None, server.stderr.read().decode()
        metadata = httpx.get(f"http://127.0.0.1:{port}/metadata").json()
        assert metadata["model"]["sha256"] == record.model_sha256
    finally:
        server.kill()
        server.wait()


def test_a_promotion_under_a_strict_umask_keeps_it():
    """'As the umask allows': under 077 nothing is opened up."""
    with tempfile.TemporaryDirectory() as folder:
        from graft.files import write_text_atomic

        old_umask = os.umask(0o077)
        try:
            write_text_atomic(Path(folder) / "x.json", "{}")
        finally:
            os.umask(old_umask)
        assert stat.S_IMODE((Path(folder) / "x.json").stat().st_mode) == 0o600


def test_a_reload_the_server_cannot_read_is_reported_in_metadata(shared_project):
    model = production(shared_project) / "model.onnx"
    model.parent.mkdir(parents=True)
    shutil.copyfile(DIGITS_MODEL, model)
    model.chmod(0o644)
    port = free_port()
    server = subprocess.Popen(
        as_another_user(
            [*GRAFT_MODULE, "serve", str(model), "--port", str(port), "--reload-interval", "0.2"]
        ),
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _ready(port) or server.poll() is not None, 120, "the server")
        assert server.poll() is None
        unreadable = model.with_name("new.onnx")
        unreadable.write_bytes(variant(2))
        unreadable.chmod(0o600 if os.geteuid() == 0 else 0o000)
        os.replace(unreadable, model)

        def reported() -> bool:
            reload = httpx.get(f"http://127.0.0.1:{port}/metadata").json()["reload"]
            return reload["last_error"] is not None

        wait_for(reported, 30, "reload.last_error")
        metadata = httpx.get(f"http://127.0.0.1:{port}/metadata").json()
        assert "ermission denied" in metadata["reload"]["last_error"]
        assert str(model) in metadata["reload"]["last_error"]
        assert metadata["model"]["sha256"] == file_sha256(DIGITS_MODEL)  # the old model serves on
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    finally:
        server.kill()
        server.wait()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- item 4: one promotion or rollback at a time ------------------------------------------------


def test_a_second_promotion_or_a_rollback_meanwhile_is_refused_and_the_first_succeeds(project):
    export_as(project, variant(1))
    first = subprocess.Popen(
        [*GRAFT_MODULE, "promote", "--root", str(project.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    staged = lambda: list(production(project).glob(".model.onnx.*.tmp"))  # noqa: E731
    wait_for(lambda: staged() or first.poll() is not None, 120, "the first promotion's infra check")
    first.send_signal(signal.SIGSTOP)  # paused in its infra check, the lock held
    try:
        assert first.poll() is None, first.communicate()
        (staged_file,) = staged()

        for command in ("promote", "rollback"):
            second = graft_cli(command, "--root", project.root, timeout=60)
            assert second.returncode == ExitCode.REFUSED, second.stderr
            assert "busy" in second.stderr and f"pid {first.pid}" in second.stderr
            assert ".lock" in second.stderr and "Traceback" not in second.stderr
            assert staged_file.exists(), f"`graft {command}` deleted the first one's staged file"

    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert served_sha256(project) == file_sha256(project.onnx_model)
    assert not staged()


# --- item 5: a production model that cannot be read ---------------------------------------------


def test_a_damaged_champion_is_a_refusal_with_the_way_out_then_rollback_or_force(project):
    first = export_as(project, variant(1))
    _promote(project)
    second = export_as(project, variant(2))
    champion = production(project) / "model.onnx"
    champion.write_bytes(b"\x08\x07garbage, not a protobuf")

    with pytest.raises(ChampionUnreadable) as refused:
        _promote(project)
    message = str(refused.value)
    assert str(champion) in message and "cannot be read" in message
    assert "graft promote --force --reason" in message and "graft rollback" in message
    assert champion.read_bytes() == b"\x08\x07garbage, not a protobuf"
    cli = graft_cli("promote", "--root", project.root)
    assert cli.returncode == ExitCode.REFUSED and "Traceback" not in cli.stderr
    assert str(champion) in cli.stderr and "--force" in cli.stderr

    # Way out 1: the kept copy of what was promoted, its sha256 checked.
    assert _rollback(project) == first == served_sha256(project)
    # Way out 2: replace it without the change gates, recorded as forced.
    champion.write_bytes(b"")
    record = _promote(project, force=True, reason="production model damaged on disk")
    assert record.promoted and record.forced and served_sha256(project) == second
    assert "cannot be read" in record.reasons[0]
    history = [json.loads(line) for line in (production(project) / "history.jsonl").open()]
    assert history[-1]["forced"] and history[-1]["reason"] == "production model damaged on disk"


# --- item 7: the infra check's server dies with the promotion -----------------------------------


def _children(pid: int) -> list[int]:
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat_file.parent.name))
    return children


def _alive(pid: int) -> bool:
    """Any of the process's threads still running (a zombie runs nothing and holds no port)."""
    for task in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            if task.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_killed_promotion_leaves_no_server_listening(project):
    export_as(project, variant(1))
    promoting = subprocess.Popen(
        [*GRAFT_MODULE, "promote", "--root", str(project.root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    servers: list[int] = []

    def serving() -> bool:
        # A child caught between fork and exec still shows the promotion's own command line.
        ports = {pid: _port_of(pid) for pid in _children(promoting.pid) if _alive(pid)}
        servers[:] = [pid for pid, port in ports.items() if port is not None]
        return bool(servers) and _ready(ports[servers[0]])

    wait_for(serving, 120, "the infra check's server")
    (server,) = servers
    port = _port_of(server)
    promoting.send_signal(signal.SIGKILL)  # the promotion only, not its process group
    promoting.wait()
    wait_for(lambda: not _alive(server), 30, "the orphaned server to die")
    wait_for(lambda: not _port_open(port), 5, "its port to close")
    # The next promotion cleans up the staged file and succeeds.
    assert _promote(project).promoted
    assert not list(production(project).glob(".*.tmp"))


def _port_of(pid: int) -> int | None:
    """The ``--port`` of a server process, None if its command line has none (yet) or it ended."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return int(argv[argv.index(b"--port") + 1]) if b"--port" in argv else None


# --- item 9: kept versions, unchanged re-promotion, rollback [--to] -----------------------------


def test_kept_versions_unchanged_repromotion_and_rollback_to_any_verified_version(project):
    write_params(project.root, {"promote": {"keep_versions": 3}})
    shas = []
    for index in (1, 2, 3):
        shas.append(export_as(project, variant(index)))
        _promote(project)
    versions = production(project) / "versions"
    index_before = (production(project) / "versions.json").read_bytes()
    served_before = (production(project) / "model.onnx").stat()

    again = _promote(project)  # the nightly run exported the same model again
    assert again.unchanged and again.promoted and again.model_sha256 == shas[2]
    assert (production(project) / "versions.json").read_bytes() == index_before
    assert (production(project) / "model.onnx").stat().st_mtime_ns == served_before.st_mtime_ns
    cli = graft_cli("promote", "--root", project.root)
    assert cli.returncode == 0 and "already in production" in cli.stdout

    shas.append(export_as(project, variant(4)))
    _promote(project)
    kept = [entry["sha256"] for entry in read_json(production(project) / "versions.json")]
    assert kept == shas[1:]  # keep_versions 3: the oldest went
    assert sorted(path.name for path in versions.iterdir()) == sorted(s[:12] for s in shas[1:])

    assert _rollback(project) == shas[2] == served_sha256(project)
    assert read_json(production(project) / "promotion.json")["model_sha256"] == shas[2]
    assert _rollback(project) == shas[1] == served_sha256(project)
    with pytest.raises(RollbackRefused, match="no earlier version"):
        _rollback(project)
    cli = graft_cli("rollback", "--root", project.root, "--to", shas[3][:8])
    assert cli.returncode == 0, cli.stderr
    assert served_sha256(project) == shas[3]
    with pytest.raises(RollbackRefused, match="no kept version"):
        _rollback(project, to=shas[0][:12])  # pruned

    damaged = versions / shas[2][:12] / "model.onnx"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
    with pytest.raises(RollbackRefused, match="does not match its recorded sha256") as refused:
        _rollback(project)
    assert str(damaged) in str(refused.value)
    assert served_sha256(project) == shas[3]  # untouched
    history = (production(project) / "history.jsonl").read_text().splitlines()
    actions = [json.loads(line)["action"] for line in history]
    assert actions == ["promote"] * 3 + ["unchanged", "unchanged", "promote"] + ["rollback"] * 3


def test_a_production_folder_with_previous_onnx_keeps_it_as_a_version(project):
    """Production folders written before versions were kept: rollback still finds the model."""
    folder = production(project)
    folder.mkdir(parents=True)
    old, current = variant(1), variant(2)
    (folder / "previous.onnx").write_bytes(old)
    (folder / "model.onnx").write_bytes(current)
    restored = _rollback(project)
    assert (folder / "model.onnx").read_bytes() == old
    assert (folder / "versions" / restored[:12] / "model.onnx").read_bytes() == old
    assert not (folder / "previous.onnx").exists()
    kept = read_json(folder / "versions.json")
    expected = [hashlib.sha256(model).hexdigest() for model in (old, current)]
    assert [entry["sha256"] for entry in kept] == expected
    assert _rollback(project, to=kept[1]["version"]) == kept[1]["sha256"]
    assert (folder / "model.onnx").read_bytes() == current


# --- item 2: one bound on the resized size, on both sides; no MemoryError escapes ---------------


def png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, "PNG")
    return buffer.getvalue()


LINES = {"1000x1": (1000, 1), "20000x1": (20000, 1), "1x20000": (1, 20000), "65535x8": (65535, 8)}


def test_training_quarantines_images_whose_resize_would_cost_gigabytes(validated, tmp_path):
    paths = ProjectPaths(shutil.copytree(validated.root, tmp_path / "project"))
    for name, size in LINES.items():
        (paths.data / "0" / f"line-{name}.png").write_bytes(png_of_size(*size))
    (paths.data / "1" / "strip-20x1.png").write_bytes(png_of_size(400, 20))  # at the bound: ok
    with data_unchanged(paths.data):
        validate.main(paths.root)
    from graft.data.manifest import read_manifest

    manifest = read_manifest(paths.manifest).set_index("path")
    for name in LINES:
        row = manifest.loc[f"0/line-{name}.png"]
        assert (row["status"], row["reason"]) == ("quarantined", "extreme_aspect_ratio")
    assert manifest.loc["1/strip-20x1.png", "status"] == "ok"


def test_the_bound_holds_in_both_preprocessings_even_without_the_loader():
    """timm's eval transform (training, export, promotion) and serving's NumPy copy refuse an
    out-of-proportion image handed to them directly, before resizing it."""
    from graft.data.images import ImageRejected
    from graft.data_config import DataConfig
    from graft.export import read_metadata
    from graft.preprocessing import eval_transform
    from graft.serving.model import Preprocessing

    config = read_metadata(DIGITS_MODEL)["preprocessing"]
    line = Image.new("RGB", (20000, 1))
    for preprocess in (
        eval_transform(DataConfig.from_dict(config)),
        Preprocessing.from_config(config),
    ):
        with pytest.raises(ImageRejected) as refused:
            preprocess(line)
        assert refused.value.reason == "extreme_aspect_ratio"
        assert tuple(preprocess(Image.new("RGB", (400, 20))).shape) == tuple(config["input_size"])


def test_memory_running_out_is_a_refused_image_never_a_memory_error(monkeypatch):
    from graft.data.images import ImageRejected, decode_image
    from graft.data_config import DataConfig
    from graft.export import read_metadata
    from graft.preprocessing import eval_transform
    from graft.serving.model import Preprocessing

    digit = png_of_size(16, 16)
    config = read_metadata(DIGITS_MODEL)["preprocessing"]
    preprocessings = (
        eval_transform(DataConfig.from_dict(config)),
        Preprocessing.from_config(config),
    )

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "load", out_of_memory)
        with pytest.raises(ImageRejected, match="too_many_pixels: not enough memory"):
            decode_image(digit)
    image = decode_image(digit).image
    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "resize", out_of_memory)
        for preprocess in preprocessings:
            with pytest.raises(ImageRejected, match="too_many_pixels: not enough memory"):
                preprocess(image)


def test_graft_serve_answers_the_gigabyte_lines_with_a_4xx_and_keeps_serving():
    with running_server(DIGITS_MODEL, "--reload-interval", "0") as server:
        for name, size in LINES.items():
            response = httpx.post(
                f"{server.url}/predict",
                content=png_of_size(*size),
                headers={"content-type": "image/png"},
                timeout=60,
            )
            assert response.status_code == 400, (name, response.text)
            assert response.json()["detail"]["reason"] == "extreme_aspect_ratio"
        good = httpx.post(
            f"{server.url}/predict",
            content=png_of_size(400, 20),
            headers={"content-type": "image/png"},
            timeout=60,
        )
        assert good.status_code == 200 and server.process.poll() is None


def test_graft_predict_reports_a_file_it_may_not_read_as_permission_denied():
    folder = Path(tempfile.mkdtemp(prefix="graft-predict-"))
    try:
        folder.chmod(0o755)
        readable, private = folder / "readable.png", folder / "private.png"
        readable.write_bytes(png_of_size(16, 16))
        private.write_bytes(png_of_size(16, 16))
        private.chmod(0o600 if os.geteuid() == 0 else 0o000)  # root's file, or no one's
        output = folder / "out"
        output.mkdir(mode=0o777)
        output.chmod(0o777)
        result = subprocess.run(
            as_another_user(
                [
                    *GRAFT_MODULE,
                    "predict",
                    str(DIGITS_MODEL),
                    str(folder),
                    "-o",
                    str(output / "p.json"),
                ]
            ),
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
        assert result.returncode == 0, result.stderr
        rows = {Path(row["path"]).name: row for row in json.loads((output / "p.json").read_text())}
        assert rows["private.png"]["error"]["reason"] == "permission_denied"
        assert "Permission denied" in rows["private.png"]["error"]["detail"]
        assert rows["readable.png"]["error"] is None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
