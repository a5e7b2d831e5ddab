"""Stage ``export``: the blessed candidate as ONNX, published only if it matches torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import yaml

import graft
from graft.classifier import build_classifier, head_architecture_of, load_checkpoint
from graft.config import load_params
from graft.export import (
    ExportRefused,
    Parity,
    check_parity,
    export_onnx,
    onnx_logits,
    onnx_session,
)
from graft.features import load_feature_set
from graft.files import read_json, replacing, write_json, write_text_atomic
from graft.model_card import model_card_markdown
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.promotion import sha256_of
from graft.quantize import quantize_static_qdq


def main(root: Path = Path(".")) -> Parity:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    blessing = read_json(paths.blessing)
    if not blessing["passed"]:
        raise ExportRefused(
            f"The candidate '{blessing['candidate']}' is not blessed ({paths.blessing}): "
            + "; ".join(blessing["reasons"])
            + ". Export refused; improve the model or change the evaluate.* thresholds."
        )
    checkpoint = load_checkpoint(paths.root / blessing["model"])
    spec = checkpoint.spec
    model = build_classifier(checkpoint)
    metrics = read_json(paths.metrics / "eval.json")
    metadata = {
        "graft_version": graft.__version__,
        "labels": json.dumps(spec.labels),
        "preprocessing": json.dumps(spec.data_config, sort_keys=True),
        "backbone": spec.backbone,
        "weights": spec.weights,
        "weights_sha256": spec.weights_sha256 or "",
        "candidate": blessing["candidate"],
        "data_version": data_version(paths.data_dvc),
        "git_revision": git_revision(paths.root),
        "metrics": json.dumps(
            {key: metrics[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")},
            sort_keys=True,
        ),
    }
    test = load_feature_set(paths.features / "test.npz")
    test_images = [paths.data / p for p in test.paths]
    transform = eval_transform(spec.data_config)
    with replacing(paths.onnx_model) as candidate:  # a refusal below leaves the old model
        input_size = spec.data_config["input_size"]
        export_onnx(model, input_size, metadata, candidate, params.export.opset)
        parity, fp32_logits = _parity_on_images(model, candidate, test_images, transform)
        if not parity.within(
            params.export.parity_max_abs_logit, params.export.parity_min_top1_agreement
        ):
            raise ExportRefused(
                f"ONNX parity failed on {parity.images} test images: max |Δ logit| "
                f"{parity.max_abs_logit_diff:.2e} "
                f"(limit {params.export.parity_max_abs_logit:.0e}), top-1 agreement "
                f"{parity.top1_agreement:.4f} (minimum "
                f"{params.export.parity_min_top1_agreement}). Nothing was published."
            )
    int8 = None
    if params.export.int8:
        train = load_feature_set(paths.features / "train.npz")
        calibration = [paths.data / p for p in train.paths[: params.export.int8_calibration_images]]
        int8 = quantize_with_gate(
            paths.onnx_model,
            paths.int8_dir,
            calibration,
            test_images,
            test.labels,
            fp32_logits,
            transform,
            params.export.int8_max_accuracy_drop,
        )
    else:
        shutil.rmtree(paths.int8_dir, ignore_errors=True)
        write_json(paths.int8_dir / "decision.json", {"kept": False, "reason": "export.int8 off"})
    candidate_metrics = read_json(paths.evaluation_details)[blessing["candidate"]]
    write_text_atomic(
        paths.model_card,
        model_card_markdown(
            spec, metadata, candidate_metrics, parity, int8, head_architecture_of(checkpoint)
        ),
    )
    write_json(
        paths.metrics / "export.json",
        {
            "parity": parity.__dict__,
            "opset": params.export.opset,
            "model_sha256": sha256_of(paths.onnx_model),
            "blessing_sha256": sha256_of(paths.blessing),
            "int8": int8,
        },
    )
    print(
        f"export: {paths.onnx_model} — parity on {parity.images} test images: "
        f"max |Δ logit| {parity.max_abs_logit_diff:.2e}, "
        f"top-1 agreement {parity.top1_agreement:.2%}"
    )
    return parity


def _parity_on_images(
    model, onnx_path: Path, image_paths: list[Path], transform, batch_size: int = 64
) -> tuple[Parity, np.ndarray]:
    """torch vs onnxruntime on the same images, and the ONNX logits."""
    session = onnx_session(onnx_path)
    torch_out, onnx_out = [], []
    for start in range(0, len(image_paths), batch_size):
        batch = load_tensor_batch(image_paths[start : start + batch_size], transform)
        with torch.inference_mode():
            torch_out.append(model(batch).numpy())
        onnx_out.append(onnx_logits(session, batch.numpy()))
    if not torch_out:
        return Parity(0, float("inf"), 0.0), np.empty((0, 0))
    onnx_all = np.concatenate(onnx_out)
    return check_parity(np.concatenate(torch_out), onnx_all), onnx_all


def quantize_with_gate(
    fp32_path: Path,
    int8_dir: Path,
    calibration_images: list[Path],
    test_images: list[Path],
    test_labels: np.ndarray,
    fp32_logits: np.ndarray,
    transform,
    max_accuracy_drop: float,
    batch_size: int = 32,
) -> dict:
    """Quantize the exported model (static INT8 QDQ, calibrated on training images) and keep it
    as ``int8_dir/model.onnx`` only when its test accuracy is within ``max_accuracy_drop`` of
    fp32. ``int8_dir/decision.json`` always says what was decided and why."""
    batches = (
        load_tensor_batch(calibration_images[i : i + batch_size], transform).numpy()
        for i in range(0, len(calibration_images), batch_size)
    )
    staging = int8_dir.with_name(f".{int8_dir.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    quantized = quantize_static_qdq(fp32_path, staging / "model.onnx", batches)
    session = onnx_session(quantized)
    inputs = [
        load_tensor_batch(test_images[i : i + batch_size], transform).numpy()
        for i in range(0, len(test_images), batch_size)
    ]
    int8_logits = np.concatenate([onnx_logits(session, batch) for batch in inputs])
    fp32_accuracy = float((fp32_logits.argmax(1) == test_labels).mean())
    int8_accuracy = float((int8_logits.argmax(1) == test_labels).mean())
    kept = fp32_accuracy - int8_accuracy <= max_accuracy_drop
    decision = {
        "kept": kept,
        "fp32_test_accuracy": fp32_accuracy,
        "int8_test_accuracy": int8_accuracy,
        "max_accuracy_drop": max_accuracy_drop,
        "calibration_images": len(calibration_images),
        "top1_agreement_with_fp32": float((int8_logits.argmax(1) == fp32_logits.argmax(1)).mean()),
        "size_ratio": fp32_path.stat().st_size / quantized.stat().st_size,
        "reason": (
            "within the allowed accuracy drop"
            if kept
            else f"test accuracy {int8_accuracy:.4f} is more than {max_accuracy_drop:.4f} below "
            f"fp32's {fp32_accuracy:.4f}: the INT8 model was not kept"
        ),
    }
    if not kept:
        quantized.unlink()
    write_json(staging / "decision.json", decision)
    shutil.rmtree(int8_dir, ignore_errors=True)
    os.replace(staging, int8_dir)
    print(f"export: INT8 {'kept' if kept else 'refused'} — {decision['reason']}")
    return decision


def data_version(data_dvc: Path) -> str:
    """The md5 DVC records for ``data/`` in ``data.dvc`` ("untracked" without one)."""
    if not data_dvc.is_file():
        return "untracked"
    outs = (yaml.safe_load(data_dvc.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def git_revision(root: Path) -> str:
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"
