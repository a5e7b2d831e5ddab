"""Stage ``export``: the blessed candidate as ONNX, published only if it matches torch."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import torch
import yaml

import graft
from graft.classifier import build_classifier, load_checkpoint
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
    with replacing(paths.onnx_model) as candidate:  # a refusal below leaves the old model
        input_size = spec.data_config["input_size"]
        export_onnx(model, input_size, metadata, candidate, params.export.opset)
        parity = _parity_on_images(
            model, candidate, [paths.data / p for p in test.paths], eval_transform(spec.data_config)
        )
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
    candidate_metrics = read_json(paths.evaluation_details)[blessing["candidate"]]
    write_text_atomic(
        paths.model_card, model_card_markdown(spec, metadata, candidate_metrics, parity)
    )
    write_json(
        paths.metrics / "export.json", {"parity": parity.__dict__, "opset": params.export.opset}
    )
    print(
        f"export: {paths.onnx_model} — parity on {parity.images} test images: "
        f"max |Δ logit| {parity.max_abs_logit_diff:.2e}, "
        f"top-1 agreement {parity.top1_agreement:.2%}"
    )
    return parity


def _parity_on_images(model, onnx_path: Path, image_paths: list[Path], transform, batch_size=64):
    session = onnx_session(onnx_path)
    torch_out, onnx_out = [], []
    for start in range(0, len(image_paths), batch_size):
        batch = load_tensor_batch(image_paths[start : start + batch_size], transform)
        with torch.inference_mode():
            torch_out.append(model(batch).numpy())
        onnx_out.append(onnx_logits(session, batch.numpy()))
    if not torch_out:
        return Parity(0, float("inf"), 0.0)
    return check_parity(np.concatenate(torch_out), np.concatenate(onnx_out))


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
