"""Promotion of the exported model to production, and rollback.

Production is one folder (``promote.production_dir``, by default ``models/production/``)::

    model.onnx       the model in production: what ``graft serve`` serves and watches
    promotion.json   how it got there: its blessing, the gate checks, forced or not and why
    model_card.md    its model card
    versions/        the last ``promote.keep_versions`` models in production, current included,
                     each as versions/<VERSION>/{model.onnx, promotion.json, model_card.md};
                     VERSION is the first 12 hex digits of the model's sha256 (what
                     ``graft serve``'s /metadata calls its version)
    versions.json    those versions, oldest promotion first, with their full sha256
    history.jsonl    one line per promotion, rollback or unchanged re-promotion
    .lock            held by the one promotion or rollback at work

``promote`` refuses unless the exported model is the export of the current blessing, then
measures the challenger and the production model (the champion) on the same test images
through their ONNX files and applies the change gates. Before anything in production changes,
an infra check serves the challenger with ``graft serve`` on loopback (a server that dies with
its parent) and compares its answers with the evaluated ones. Each switch is a rename of a
complete file, so a reader (or a server watching ``model.onnx``) sees the old model or the new
one, never half of either, and a promotion killed at any point leaves a complete model in
production. Promoting the model already in production changes nothing (a history line says so).

``rollback`` puts back the version promoted before the current one (again: the one before
that), or ``--to VERSION``, after checking that the kept file's sha256 is the one recorded.

Files are created with the mode the umask gives (0644 under the usual 022), so a server
running as another user can read them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graft import lifeline
from graft.config import Params
from graft.errors import MissingInputError, Refused
from graft.evaluate import GateCheck, change_checks, classification_metrics
from graft.files import (
    file_sha256,
    read_json,
    replacing,
    temporary_beside,
    write_json,
    write_text_atomic,
)
from graft.paths import ProjectPaths

MODEL, RECORD, CARD = "model.onnx", "promotion.json", "model_card.md"
VERSION_DIGITS = 12


class PromotionRefused(Refused):
    """The exported model may not replace the production model; production is untouched."""


class ProductionBusy(PromotionRefused):
    """Another promotion or rollback holds the production folder's lock."""


class ChampionUnreadable(PromotionRefused):
    """The model in production cannot be read, so the change gates cannot compare with it."""


class RollbackRefused(Refused):
    """There is no kept version to roll back to, or it does not match its recorded sha256."""


@dataclass
class InfraCheck:
    passed: bool
    images: int
    top1_agreement: float
    max_prob_diff: float
    detail: str = ""


@dataclass
class Promotion:
    promoted: bool
    forced: bool
    reason: str | None
    model_sha256: str
    previous_sha256: str | None
    blessing: dict[str, Any]
    metrics: dict[str, Any]
    champion_metrics: dict[str, Any] | None
    checks: list[GateCheck] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    infra_check: InfraCheck | None = None
    unchanged: bool = False  # the model was already in production: nothing was switched

    @property
    def version(self) -> str:
        return self.model_sha256[:VERSION_DIGITS]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KeptVersion:
    """One model kept in ``versions/`` for rollback."""

    version: str
    sha256: str
    promoted_at: str


def production_dir(paths: ProjectPaths, params: Params) -> Path:
    return paths.root / params.promote.production_dir


def test_images(paths: ProjectPaths) -> tuple[list[Path], list[str]]:
    """The test split's usable images and their labels, from the validated manifest."""
    from graft.data.manifest import read_manifest, usable_rows

    if not paths.manifest.is_file():
        raise MissingInputError(paths.manifest, "run `dvc repro` first.")
    manifest = read_manifest(paths.manifest)
    test = usable_rows(manifest, "test")
    return [paths.data / p for p in test["path"]], [str(label) for label in test["label"]]


def onnx_probabilities(model_path: Path, images: list[Path], batch_size: int = 64) -> np.ndarray:
    """Class probabilities of an exported model on ``images``, preprocessed as its metadata says."""
    from graft.data_config import DataConfig
    from graft.export import read_metadata
    from graft.numeric import softmax
    from graft.preprocessing import eval_transform, load_tensor_batch
    from graft.runtime import inference_session, run_single

    config = DataConfig.from_dict(read_metadata(model_path)["preprocessing"])
    transform = eval_transform(config)
    session = inference_session(model_path)
    logits = [
        run_single(session, load_tensor_batch(images[i : i + batch_size], transform).numpy())
        for i in range(0, len(images), batch_size)
    ]
    return softmax(np.concatenate(logits))


def measure(model_path: Path, images: list[Path], labels: list[str]) -> tuple[dict, np.ndarray]:
    """Test metrics of an ONNX model on labelled images, and its probabilities."""
    from graft.export import read_metadata

    model_labels = read_metadata(model_path)["labels"]
    unknown = sorted(set(labels) - set(model_labels))
    if unknown:
        return {"accuracy": float("nan"), "per_class": {}, "unknown_labels": unknown}, np.empty(0)
    probabilities = onnx_probabilities(model_path, images)
    y_true = np.array([model_labels.index(label) for label in labels])
    return classification_metrics(y_true, probabilities, model_labels), probabilities


def _check_export_is_current(paths: ProjectPaths) -> None:
    for path in (paths.blessing, paths.onnx_model, paths.metrics / "export.json"):
        if not path.is_file():
            raise MissingInputError(path, "run `dvc repro export` first.")
    export = read_json(paths.metrics / "export.json")
    if export.get("model_sha256") != file_sha256(paths.onnx_model) or export.get(
        "blessing_sha256"
    ) != file_sha256(paths.blessing):
        raise PromotionRefused(
            f"{paths.onnx_model} is not the export of the current blessing "
            f"({paths.blessing}): run `dvc repro export` first."
        )


@contextmanager
def production_lock(production: Path, action: str, wait_s: float = 3.0) -> Iterator[None]:
    """Hold ``production/.lock`` exclusively for one promotion or rollback.

    The kernel releases the lock when its holder exits, even by SIGKILL, so a killed promotion
    never blocks the next one. A holder killed while it was starting its infra-check server can
    leave that half-started child holding the lock for a moment as it dies: the lock is tried
    again for ``wait_s`` before the refusal.

    Raises:
        ProductionBusy: naming the holder, if another process still holds the lock.
    """
    import fcntl  # POSIX; imported here so that the rest of the module imports everywhere

    production.mkdir(parents=True, exist_ok=True)
    lock = production / ".lock"
    with lock.open("a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise ProductionBusy(
                    f"{production} is busy: {holder} holds {lock}. Production is untouched; "
                    f"run `graft {action}` again when it has finished."
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"`graft {action}` (pid {os.getpid()}, since {_now()})\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def promote(
    root: Path, params: Params, force: bool = False, reason: str | None = None
) -> Promotion:
    """Gate, infra-check and switch production to the exported model; see the module doc."""
    paths = ProjectPaths(root)
    if force and not (reason and reason.strip()):
        raise PromotionRefused("A forced promotion needs a reason: add --reason '...'.")
    production = production_dir(paths, params)
    with production_lock(production, "promote"):
        _remove_leftovers(production)
        return _promote_locked(paths, params, production, force, reason)


def _promote_locked(
    paths: ProjectPaths, params: Params, production: Path, force: bool, reason: str | None
) -> Promotion:
    _check_export_is_current(paths)
    blessing = read_json(paths.blessing)
    if not blessing["passed"]:
        raise PromotionRefused(
            "The exported candidate is not blessed: " + "; ".join(blessing["reasons"])
        )
    current = production / MODEL
    challenger_sha256 = file_sha256(paths.onnx_model)
    champion_sha256, champion_problem = _champion(current)
    if champion_sha256 == challenger_sha256:
        _record_switch(production, {"action": "unchanged", "sha256": challenger_sha256})
        record = read_json(production / RECORD) if (production / RECORD).is_file() else {}
        return Promotion(
            promoted=True,
            forced=False,
            reason=None,
            model_sha256=challenger_sha256,
            previous_sha256=challenger_sha256,
            blessing=blessing,
            metrics=record.get("metrics", {}),
            champion_metrics=record.get("champion_metrics"),
            unchanged=True,
        )
    if champion_problem and not force:
        raise ChampionUnreadable(
            f"The production model {current} cannot be read ({champion_problem}), so the "
            "challenger cannot be compared with it. Production is untouched. Either replace it "
            "without the change gates: `graft promote --force --reason '...'`, or restore a "
            "kept version: `graft rollback` (or `graft rollback --to VERSION`; see "
            f"{production / 'versions.json'})."
        )

    images, labels = test_images(paths)
    metrics, probabilities = measure(paths.onnx_model, images, labels)
    champion_metrics = None
    checks: list[GateCheck] = []
    reasons: list[str] = []
    if champion_problem:
        reasons.append(f"the production model {current} cannot be read ({champion_problem})")
    elif champion_sha256:
        champion_metrics, _ = measure(current, images, labels)
        checks, reasons = change_checks(metrics, champion_metrics, params.evaluate)
    record = Promotion(
        promoted=False,
        forced=bool(force and reasons),
        reason=reason.strip() if force and reason else None,
        model_sha256=challenger_sha256,
        previous_sha256=champion_sha256,
        blessing=dict(blessing, forced=bool(force and reasons), forced_reason=reason),
        metrics=_summary(metrics),
        champion_metrics=_summary(champion_metrics) if champion_metrics else None,
        checks=checks,
        reasons=reasons,
    )
    if reasons and not force:
        _report(paths, record)
        raise PromotionRefused("Promotion refused by the change gates: " + "; ".join(reasons) + ".")

    staged = temporary_beside(current)
    try:
        shutil.copyfile(paths.onnx_model, staged)
        count = min(params.promote.infra_check_images, len(images))
        record.infra_check = infra_check(
            staged, images[:count], probabilities[:count], params.promote
        )
        if not record.infra_check.passed:
            _report(paths, record)
            raise PromotionRefused(
                f"The infra check failed, production is unchanged: {record.infra_check.detail}"
            )
        record.promoted = True
        kept = _kept_versions(production, champion_sha256 if not champion_problem else None)
        version = _keep(production, staged, record.model_sha256, record.to_dict(), paths.model_card)
        os.replace(staged, current)  # the switch
    finally:
        staged.unlink(missing_ok=True)
    _publish(production, version)
    kept = [entry for entry in kept if entry.sha256 != version.sha256] + [version]
    _write_versions(production, _pruned(production, kept, version, params.promote.keep_versions))
    entry = {"action": "promote", "sha256": record.model_sha256}
    if record.forced:
        entry.update(forced=True, reason=record.reason)
    _record_switch(production, entry)
    _report(paths, record)
    return record


def rollback(root: Path, params: Params, to: str | None = None) -> str:
    """Put a kept version back into production; return its sha256.

    Without ``to``, the version promoted before the current one; ``to`` is a version (a prefix
    of the sha256, at least 6 hex digits). The kept file's sha256 is checked against the one
    recorded before the switch and the file put in place is checked again after it.

    Raises:
        MissingInputError: when nothing has been promoted yet.
        RollbackRefused: when there is no earlier version, ``to`` names no kept version, or the
            kept file does not match its recorded sha256. Production is untouched.
    """
    paths = ProjectPaths(root)
    production = production_dir(paths, params)
    with production_lock(production, "rollback"):
        _remove_leftovers(production)
        current = production / MODEL
        current_sha256, problem = _champion(current)
        kept = _kept_versions(production, None if problem else current_sha256)
        target = _rollback_target(production, kept, current_sha256, to)
        source = production / "versions" / target.version / MODEL
        found = file_sha256(source)
        if found != target.sha256:
            raise RollbackRefused(
                f"{source} does not match its recorded sha256 ({found[:12]} instead of "
                f"{target.version}): it was changed or damaged. Production is untouched; choose "
                f"another version with `graft rollback --to VERSION` (kept: "
                f"{', '.join(entry.version for entry in kept)})."
            )
        with replacing(current) as staged:
            shutil.copyfile(source, staged)
            if file_sha256(staged) != target.sha256:
                raise RollbackRefused(f"copying {source} did not give the same bytes: try again.")
        _publish(production, target)
        _write_versions(production, kept)
        entry = {"action": "rollback", "sha256": target.sha256, "from_sha256": current_sha256}
        _record_switch(production, entry)
    return target.sha256


def _champion(current: Path) -> tuple[str | None, str | None]:
    """The production model's sha256 (None when there is none) and why it is unusable, if it is.

    The champion is read the way the change gates read it: its bytes, then its ONNX metadata.
    """
    from graft.export import read_metadata

    if not current.exists():
        return None, None
    try:
        sha256 = file_sha256(current)
    except OSError as exc:
        return None, f"{exc.strerror or exc}"
    try:
        metadata = read_metadata(current)
        if not isinstance(metadata.get("labels"), list) or "preprocessing" not in metadata:
            return sha256, "its ONNX metadata has no labels or preprocessing"
    except Exception as exc:  # onnx/protobuf raise many unrelated types for a damaged file
        return sha256, f"not a readable ONNX model: {type(exc).__name__}: {exc}".strip()
    return sha256, None


def _kept_versions(production: Path, current_sha256: str | None) -> list[KeptVersion]:
    """The kept versions, oldest promotion first; the readable model in production is one.

    A production folder from before versions were kept (``previous.onnx``), or a model put in
    place by hand, is taken in: its file is kept before anything replaces it.
    """
    index = production / "versions.json"
    kept = [KeptVersion(**entry) for entry in read_json(index)] if index.is_file() else []
    kept = [entry for entry in kept if (production / "versions" / entry.version).is_dir()]
    legacy = production / "previous.onnx"
    if not index.is_file() and legacy.is_file():
        sha256 = file_sha256(legacy)
        record = production / "previous.json"
        kept.append(_keep(production, legacy, sha256, _record_of(record, sha256), None))
    if current_sha256 and current_sha256 not in {entry.sha256 for entry in kept}:
        record = _record_of(production / RECORD, current_sha256)
        card = production / CARD if record else None
        kept.append(_keep(production, production / MODEL, current_sha256, record, card))
    return kept


def _record_of(path: Path, sha256: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    record = read_json(path)
    return record if record.get("model_sha256") == sha256 else None


def _keep(
    production: Path,
    model: Path,
    sha256: str,
    record: dict[str, Any] | None,
    card: Path | None,
) -> KeptVersion:
    """Copy a model with its record and card into ``versions/<VERSION>/`` (complete, or not at
    all: the folder is written under a temporary name, then renamed)."""
    version = KeptVersion(sha256[:VERSION_DIGITS], sha256, _now())
    folder = production / "versions" / version.version
    if (folder / MODEL).is_file() and file_sha256(folder / MODEL) == sha256:
        return version
    building = temporary_beside(folder)
    building.unlink()
    building.mkdir()
    try:
        shutil.copyfile(model, building / MODEL)
        if record is not None:
            write_json(building / RECORD, record)
        if card is not None and card.is_file():
            shutil.copyfile(card, building / CARD)
        shutil.rmtree(folder, ignore_errors=True)  # a damaged copy: replaced by a good one
        os.replace(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return version


def _publish(production: Path, version: KeptVersion) -> None:
    """The record and model card of ``version`` beside ``model.onnx`` (which already is it)."""
    folder = production / "versions" / version.version
    for name in (RECORD, CARD):
        if (folder / name).is_file():
            _copy_atomic(folder / name, production / name)
        else:
            (production / name).unlink(missing_ok=True)
    for legacy in ("previous.onnx", "previous.json"):  # replaced by versions/
        (production / legacy).unlink(missing_ok=True)


def _pruned(
    production: Path, kept: list[KeptVersion], current: KeptVersion, keep: int
) -> list[KeptVersion]:
    """Drop the oldest versions beyond ``keep`` (never the one in production)."""
    kept = list(kept)
    while len(kept) > keep:
        oldest = next(entry for entry in kept if entry.sha256 != current.sha256)
        shutil.rmtree(production / "versions" / oldest.version, ignore_errors=True)
        kept.remove(oldest)
    return kept


def _write_versions(production: Path, kept: list[KeptVersion]) -> None:
    write_json(production / "versions.json", [asdict(entry) for entry in kept])


def _rollback_target(
    production: Path, kept: list[KeptVersion], current_sha256: str | None, to: str | None
) -> KeptVersion:
    if not kept:
        raise MissingInputError(
            production / "versions.json", "nothing has been promoted yet: no version to go back to."
        )
    listed = ", ".join(entry.version for entry in kept)
    if to is not None:
        wanted = to.strip().lower()
        matches = [entry for entry in kept if len(wanted) >= 6 and entry.sha256.startswith(wanted)]
        if len(matches) != 1:
            raise RollbackRefused(
                f"--to {to} names {'several' if matches else 'no'} kept version: give at least "
                f"6 hex digits of one of {listed} (in {production / 'versions.json'})."
            )
        (target,) = matches
        if target.sha256 == current_sha256:
            raise RollbackRefused(f"{target.version} is already in production: nothing to do.")
        return target
    shas = [entry.sha256 for entry in kept]
    position = shas.index(current_sha256) if current_sha256 in shas else len(kept)
    if position == 0:
        raise RollbackRefused(
            f"There is no earlier version to roll back to: kept versions are {listed}, and "
            f"{production / MODEL} is the oldest. `graft rollback --to VERSION` goes to any."
        )
    return kept[position - 1]


def _record_switch(production: Path, entry: dict[str, Any]) -> None:
    """Write down a change of production (or a re-promotion that changed nothing) in
    ``history.jsonl``. The one place a promotion or rollback ends: a model registry that must
    learn of each switch is told here."""
    line = {"time": _now(), **entry}
    with (production / "history.jsonl").open("a") as history:
        history.write(json.dumps(line) + "\n")


def infra_check(
    model_path: Path, images: list[Path], expected: np.ndarray, settings: Any
) -> InfraCheck:
    """Serve ``model_path`` with the real ``graft serve`` on loopback and compare its answers on
    ``images`` with ``expected`` (the evaluated probabilities, one row per image).

    The server dies with this process (:mod:`graft.lifeline`): a promotion that is killed
    leaves no server behind.
    """
    port = _free_port()
    command = [sys.executable, "-m", "graft", "serve", str(model_path), "--port", str(port)]
    command += ["--host", "127.0.0.1"]
    server = subprocess.Popen(
        lifeline.command(os.getpid(), command),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        if not _wait_ready(base, server, settings.infra_check_timeout_s):
            return InfraCheck(False, 0, 0.0, float("inf"), _server_failure(server))
        agree, worst = 0, 0.0
        labels = _served_labels(base)
        for image, row in zip(images, expected, strict=True):
            probabilities = _predict(base, image, labels)
            agree += int(np.argmax(probabilities) == np.argmax(row))
            worst = max(worst, float(np.max(np.abs(probabilities - row))))
        n = len(images)
        passed = n > 0 and agree == n and worst <= settings.infra_check_max_prob_diff
        detail = (
            f"{agree}/{n} top-1 answers agree with the evaluated model, "
            f"max |Δ probability| {worst:.2e} (limit {settings.infra_check_max_prob_diff:.0e})"
        )
        return InfraCheck(passed, n, agree / n if n else 0.0, worst, detail)
    except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
        return InfraCheck(False, 0, 0.0, float("inf"), f"the server did not answer: {exc}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(base: str, server: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    return False


def _server_failure(server: subprocess.Popen) -> str:
    if server.poll() is None:
        return "the server did not become ready in time"
    return f"the server exited with code {server.returncode}: {server.stderr.read()[-2000:]}"


def _served_labels(base: str) -> list[str]:
    with urllib.request.urlopen(f"{base}/metadata", timeout=10) as response:
        return list(json.loads(response.read())["labels"])


def _predict(base: str, image: Path, labels: list[str]) -> np.ndarray:
    """The served probabilities for one image (sent as a raw body), in the order of ``labels``."""
    request = urllib.request.Request(
        f"{base}/predict?top_k={len(labels)}",
        data=image.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        (prediction,) = json.loads(response.read())["predictions"]
    served = {entry["label"]: entry["probability"] for entry in prediction["top_k"]}
    return np.array([served[label] for label in labels])


def _summary(metrics: dict[str, Any] | None) -> dict[str, Any]:
    if not metrics:
        return {}
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "accuracy_ci95", "n", "unknown_labels")
    summary = {key: metrics[key] for key in keys if key in metrics}
    summary["recall"] = {label: s["recall"] for label, s in metrics.get("per_class", {}).items()}
    return summary


def _copy_atomic(source: Path, dest: Path) -> None:
    with replacing(dest) as temporary:
        shutil.copyfile(source, temporary)


def _remove_leftovers(production: Path) -> None:
    """Temporary files and folders of a promotion that was killed (only ever called with the
    lock held, so never another one's staged file)."""
    for folder in (production, production / "versions"):
        for leftover in folder.glob(".*.tmp"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _report(paths: ProjectPaths, record: Promotion) -> None:
    from graft.report import promotion_markdown

    write_text_atomic(paths.root / "reports" / "promotion.md", promotion_markdown(record.to_dict()))
