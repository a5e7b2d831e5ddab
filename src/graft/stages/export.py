"""Stage ``export``: the blessed candidate as ONNX, published only if it matches torch."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from graft.classifier import build_classifier, head_architecture_of, load_checkpoint
from graft.config import load_params
from graft.ensemble import ProbabilityAverage
from graft.export import ExportRefused, Parity, export_onnx, parity_on_images
from graft.features import load_feature_set
from graft.files import file_sha256, read_json, replacing, write_json, write_text_atomic
from graft.model_card import model_card_markdown
from graft.model_metadata import model_metadata
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform
from graft.quantize import quantize_with_gate


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
    if blessing["candidate"] == "average":  # the head and the fine-tuned model, in one graph
        model = ProbabilityAverage([build_classifier(load_checkpoint(paths.head_model)), model])
    metrics = read_json(paths.metrics / "eval.json")
    metadata = model_metadata(
        spec,
        candidate=blessing["candidate"],
        metrics=metrics,
        data_version=data_version(paths.data_dvc),
        git_revision=git_revision(paths.root),
    )
    test = load_feature_set(paths.features / "test.npz")
    test_images = [paths.data / p for p in test.paths]
    transform = eval_transform(spec.data_config)
    with replacing(paths.onnx_model) as candidate:  # a refusal below leaves the old model
        input_size = spec.data_config["input_size"]
        export_onnx(model, input_size, candidate, opset=params.export.opset, metadata=metadata)
        parity, fp32_logits = parity_on_images(model, candidate, test_images, transform)
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
        print(f"export: INT8 {'kept' if int8['kept'] else 'refused'} — {int8['reason']}")
    else:
        shutil.rmtree(paths.int8_dir, ignore_errors=True)
        write_json(paths.int8_dir / "decision.json", {"kept": False, "reason": "export.int8 off"})
    candidate_metrics = read_json(paths.evaluation_details)[blessing["candidate"]]
    write_text_atomic(
        paths.model_card,
        model_card_markdown(
            spec,
            metadata,
            candidate_metrics,
            parity,
            int8,
            head_architecture_of(checkpoint),
            checkpoint.info.get("probe"),
        ),
    )
    write_json(
        paths.metrics / "export.json",
        {
            "parity": parity.__dict__,
            "opset": params.export.opset,
            "model_sha256": file_sha256(paths.onnx_model),
            "blessing_sha256": file_sha256(paths.blessing),
            "int8": int8,
        },
    )
    print(
        f"export: {paths.onnx_model} — parity on {parity.images} test images: "
        f"max |Δ logit| {parity.max_abs_logit_diff:.2e}, "
        f"top-1 agreement {parity.top1_agreement:.2%}"
    )
    return parity


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
