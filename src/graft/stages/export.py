"""Stage ``export``: the blessed candidate as ONNX, published only if it matches torch."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import yaml

from graft.classifier import build_classifier, head_architecture_of, load_checkpoint
from graft.config import load_params
from graft.ensemble import ProbabilityAverage
from graft.export import (
    INPUT_NAME,
    ExportRefused,
    Parity,
    describe_model,
    export_onnx,
    parity_on_images,
)
from graft.features import load_feature_set
from graft.files import file_sha256, read_json, replacing, write_json, write_text_atomic
from graft.model_card import model_card_markdown
from graft.model_metadata import (
    contract_doc_string,
    encode_metadata,
    model_metadata,
    model_version_of,
)
from graft.paths import ProjectPaths
from graft.portable import uint8_nhwc_variant
from graft.preprocessing import eval_transform, load_rgb, resize_and_crop
from graft.quantize import Int8Gate, LabelledImages, calibration_sample, quantize_with_gate
from graft.runtime import MAX_PIXELS_PER_RUN, inference_session, rows_per_run
from graft.tta import InvariantAverage


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
    checkpoint_path = paths.root / blessing["model"]
    checkpoint = load_checkpoint(checkpoint_path)
    spec = checkpoint.spec
    model = build_classifier(checkpoint)
    if blessing["candidate"] == "average":  # the head and the fine-tuned model, in one graph
        model = ProbabilityAverage([build_classifier(load_checkpoint(paths.head_model)), model])
    tta = list(blessing.get("tta") or [])
    if tta:  # averaged over the transformations the data is invariant to, in the same graph
        model = InvariantAverage(model, tta)
    metrics = read_json(paths.metrics / "eval.json")
    metadata = model_metadata(
        spec,
        candidate=blessing["candidate"],
        metrics=metrics,
        data_version=data_version(paths.data_dvc),
        git_revision=git_revision(paths.root),
    )
    if tta:
        metadata.update(encode_metadata({"test_time_augmentation": tta}))
    members = [checkpoint_path] + ([paths.head_model] if blessing["candidate"] == "average" else [])
    version = model_version_of(
        hashlib.sha256(
            ("".join(file_sha256(member) for member in members) + ",".join(tta)).encode()
        ).hexdigest()
    )
    test = load_feature_set(paths.features / "test.npz", mmap=True)  # its paths and labels only
    test_images = [paths.data / p for p in test.paths]
    # With TTA every image is run len(tta) times: every len(tta)-th test image keeps the checks
    # at the cost of a model without it.
    checked = test_images[:: len(tta)] if tta else test_images
    transform = eval_transform(spec.data_config)
    limits = params.export
    with replacing(paths.onnx_model) as candidate:  # a refusal below leaves the old model
        export_onnx(
            model,
            spec.data_config.input_size,
            candidate,
            opset=limits.opset,
            metadata=metadata,
            doc_string=contract_doc_string(spec),
            model_version=version,
        )
        parity, fp32_logits = parity_on_images(model, candidate, checked, transform)
        if not parity.within(limits.parity_max_relative_logit, limits.parity_min_top1_agreement):
            raise ExportRefused(
                f"ONNX parity failed on {parity.images} test images: max |Δ logit| "
                f"{parity.max_abs_logit_diff:.2e}, {parity.max_relative_logit_diff:.2e} of the "
                f"image's largest |logit| (limit {limits.parity_max_relative_logit:.0e}, "
                f"export.parity_max_relative_logit), top-1 agreement "
                f"{parity.top1_agreement:.4f} (minimum {limits.parity_min_top1_agreement}). "
                "Nothing was published."
            )
    write_labels(paths.onnx_model.parent, spec.labels)
    portable = _portable(paths, spec, version, checked, fp32_logits, limits)
    int8 = None
    if limits.int8 and tta:
        int8 = {"kept": False, "reason": INT8_WITH_TTA.format(copies=len(tta))}
        shutil.rmtree(paths.int8_dir, ignore_errors=True)
        write_json(paths.int8_dir / "decision.json", int8)
        print(f"export: INT8 skipped — {int8['reason']}")
    elif limits.int8:
        train = load_feature_set(paths.features / "train.npz", mmap=True)
        val = load_feature_set(paths.features / "val.npz", mmap=True)
        chosen = calibration_sample(train.labels, train.sha256, limits.int8_calibration_images)
        int8 = quantize_with_gate(
            paths.onnx_model,
            paths.int8_dir,
            [paths.data / p for p in train.paths[chosen]],
            LabelledImages([paths.data / p for p in val.paths], val.labels),
            LabelledImages(test_images, test.labels),
            transform,
            Int8Gate(
                limits.int8_max_accuracy_drop,
                limits.int8_min_top1_agreement,
                tuple(limits.int8_calibration_methods),
                limits.int8_max_float_units,
            ),
        )
        if int8["kept"]:
            _describe_variant(paths.int8_dir / "model.onnx", metadata, spec, version)
            write_labels(paths.int8_dir, spec.labels)
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
            "parity": asdict(parity),
            "opset": limits.opset,
            "model_sha256": file_sha256(paths.onnx_model),
            "model_version": version,
            "blessing_sha256": file_sha256(paths.blessing),
            "portable": portable,
            "int8": int8,
        },
    )
    print(
        f"export: {paths.onnx_model} — parity on {parity.images} test images: "
        f"max |Δ logit| {parity.max_abs_logit_diff:.2e} "
        f"({parity.max_relative_logit_diff:.2e} relative), "
        f"top-1 agreement {parity.top1_agreement:.2%}"
    )
    return parity


INT8_WITH_TTA = (
    "not tried: the model averages {copies} transformed copies of each image (test-time "
    "augmentation), so INT8's gate would run every calibration, val and test image {copies} "
    "times per calibration method; set evaluate.tta: false for an INT8 model"
)


def write_labels(folder: Path, labels: list[str]) -> None:
    """``labels.txt``: one label per line, in the order of the model's outputs."""
    write_text_atomic(folder / "labels.txt", "".join(f"{label}\n" for label in labels))


def _describe_variant(path: Path, metadata: dict[str, str], spec, version: int, **doc) -> None:
    proto = onnx.load(str(path))
    describe_model(
        proto, metadata, doc_string=contract_doc_string(spec, **doc), model_version=version
    )
    with replacing(path) as temporary:
        onnx.save(proto, str(temporary))


def _portable(
    paths: ProjectPaths,
    spec,
    version: int,
    test_images: list[Path],
    fp32_logits: np.ndarray,
    limits,
) -> dict:
    """``models/portable/``: the uint8 NHWC variant, checked against the float model on test.

    Its runs take as many images as the other session-only checks (16 at 224 px): 64 a run
    lifted the stage's peak by 0.6 GB on the sample.
    """
    folder = paths.portable_dir
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if not limits.preprocess_in_graph:
        write_text_atomic(folder / "README.txt", "export.preprocess_in_graph is off.\n")
        return {"made": False}
    config = spec.data_config
    variant = uint8_nhwc_variant(onnx.load(str(paths.onnx_model)), config.mean, config.std)
    with replacing(folder / "model.onnx") as temporary:
        onnx.save(variant, str(temporary))
    _describe_variant(
        folder / "model.onnx",
        {e.key: e.value for e in variant.metadata_props},
        spec,
        version,
        uint8_input=True,
    )
    session = inference_session(folder / "model.onnx")
    batch_size = rows_per_run(config.input_size, MAX_PIXELS_PER_RUN)
    pixels = resize_and_crop(config)
    outputs = [
        session.run(None, {INPUT_NAME: np.stack([pixels(load_rgb(p)) for p in chunk])})[0]
        for chunk in (
            test_images[i : i + batch_size] for i in range(0, len(test_images), batch_size)
        )
    ]
    max_diff = float(np.abs(np.concatenate(outputs) - fp32_logits).max()) if outputs else 0.0
    if not max_diff <= PORTABLE_MAX_LOGIT_DIFF:
        raise ExportRefused(
            f"{folder / 'model.onnx'} (normalisation inside the graph) differs from "
            f"{paths.onnx_model} by {max_diff:.2e} in a logit on the test images (limit "
            f"{PORTABLE_MAX_LOGIT_DIFF:.0e}); set export.preprocess_in_graph: false and report it."
        )
    write_labels(folder, spec.labels)
    return {"made": True, "test_images": len(test_images), "max_abs_logit_diff": max_diff}


PORTABLE_MAX_LOGIT_DIFF = 1e-4


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
