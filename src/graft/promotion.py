"""Promotion of the exported model to production, and rollback.

Production is one folder (``promote.production_dir``, by default ``models/production/``)::

    model.onnx       the model in production: what ``graft serve`` serves and watches
    promotion.json   how it got there: its blessing, the gate checks, forced or not and why
    model_card.md    its model card
    previous.onnx    the model it replaced (with previous.json), what ``graft rollback`` restores
    history.jsonl    one line per promotion or rollback

``promote`` refuses unless the exported model is the export of the current blessing, then
measures the challenger and the production model (the champion) on the same test images
through their ONNX files and applies the change gates. Before anything in production changes,
an infra check serves the challenger with ``graft serve`` on loopback and compares its answers
with the evaluated ones. Each switch is a rename of a complete file, so a reader (or a server
watching ``model.onnx``) sees the old model or the new one, never half of either, and a
promotion killed at any point leaves a complete model in production.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


class PromotionRefused(Refused):
    """The exported model may not replace the production model; production is untouched."""


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    from graft.export import read_metadata
    from graft.numeric import softmax
    from graft.preprocessing import eval_transform, load_tensor_batch
    from graft.runtime import inference_session, run_single

    transform = eval_transform(read_metadata(model_path)["preprocessing"])
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


def promote(
    root: Path, params: Params, force: bool = False, reason: str | None = None
) -> Promotion:
    """Gate, infra-check and switch production to the exported model; see the module doc."""
    paths = ProjectPaths(root)
    if force and not (reason and reason.strip()):
        raise PromotionRefused("A forced promotion needs a reason: add --reason '...'.")
    _check_export_is_current(paths)
    blessing = read_json(paths.blessing)
    if not blessing["passed"]:
        raise PromotionRefused(
            "The exported candidate is not blessed: " + "; ".join(blessing["reasons"])
        )
    production = production_dir(paths, params)
    production.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(production)
    current = production / "model.onnx"

    images, labels = test_images(paths)
    metrics, probabilities = measure(paths.onnx_model, images, labels)
    champion_metrics = None
    checks: list[GateCheck] = []
    reasons: list[str] = []
    if current.is_file():
        champion_metrics, _ = measure(current, images, labels)
        checks, reasons = change_checks(metrics, champion_metrics, params.evaluate)
    record = Promotion(
        promoted=False,
        forced=bool(force and reasons),
        reason=reason.strip() if force and reason else None,
        model_sha256=file_sha256(paths.onnx_model),
        previous_sha256=file_sha256(current) if current.is_file() else None,
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
        if current.is_file():
            _copy_atomic(current, production / "previous.onnx")
            if (production / "promotion.json").is_file():
                _copy_atomic(production / "promotion.json", production / "previous.json")
        os.replace(staged, current)  # the switch
    finally:
        staged.unlink(missing_ok=True)
    record.promoted = True
    write_json(production / "promotion.json", record.to_dict())
    if paths.model_card.is_file():
        _copy_atomic(paths.model_card, production / "model_card.md")
    _append_history(production, "promote", record.model_sha256, record.forced, record.reason)
    _report(paths, record)
    return record


def rollback(root: Path, params: Params) -> str:
    """Put the previous production model back (and keep the current one as the previous)."""
    paths = ProjectPaths(root)
    production = production_dir(paths, params)
    current, previous = production / "model.onnx", production / "previous.onnx"
    if not previous.is_file():
        raise MissingInputError(
            previous, "there is no previous model to roll back to: production has had at most one."
        )
    restored = file_sha256(previous)
    outgoing = temporary_beside(current)
    try:
        shutil.copyfile(current, outgoing)
        os.replace(previous, current)  # the switch
        os.replace(outgoing, previous)
    finally:
        outgoing.unlink(missing_ok=True)
    records = production / "promotion.json", production / "previous.json"
    if all(path.is_file() for path in records):
        current_record, previous_record = (read_json(path) for path in records)
        write_json(records[0], previous_record)
        write_json(records[1], current_record)
    _append_history(production, "rollback", restored, False, None)
    return restored


def infra_check(
    model_path: Path, images: list[Path], expected: np.ndarray, settings: Any
) -> InfraCheck:
    """Serve ``model_path`` with the real ``graft serve`` on loopback and compare its answers on
    ``images`` with ``expected`` (the evaluated probabilities, one row per image)."""
    port = _free_port()
    command = [sys.executable, "-m", "graft", "serve", str(model_path), "--port", str(port)]
    command += ["--host", "127.0.0.1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    """Temporary files of a promotion that was killed: never a file production points at."""
    for leftover in production.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def _append_history(
    production: Path, action: str, sha256: str, forced: bool, reason: str | None
) -> None:
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "action": action, "sha256": sha256}
    if forced:
        entry.update(forced=True, reason=reason)
    with (production / "history.jsonl").open("a") as history:
        history.write(json.dumps(entry) + "\n")


def _report(paths: ProjectPaths, record: Promotion) -> None:
    from graft.report import promotion_markdown

    write_text_atomic(paths.root / "reports" / "promotion.md", promotion_markdown(record.to_dict()))
