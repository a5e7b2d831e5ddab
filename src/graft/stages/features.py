"""Stage ``features``: embed every validated image with the frozen backbone, per split."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from graft.backbones import create_backbone
from graft.classifier import ModelSpec
from graft.config import load_params
from graft.data.manifest import read_manifest
from graft.engines import make_runner
from graft.features import FeatureSet, forward_in_batches, save_feature_set
from graft.files import read_json, write_json
from graft.paths import ProjectPaths
from graft.preprocessing import eval_transform

SPLITS = ("train", "val", "test")


def main(root: Path = Path(".")) -> ModelSpec:
    paths = ProjectPaths(root)
    params = load_params(paths.params)
    manifest = read_manifest(paths.manifest)
    usable = manifest[manifest["status"] == "ok"]
    labels = sorted(usable["label"].unique())
    backbone = create_backbone(params.backbone.name, params.backbone.weights)
    transform = eval_transform(backbone.data_config)
    index_of = {label: i for i, label in enumerate(labels)}
    batch_size = params.features.batch_size
    runner = make_runner(
        backbone.model, backbone.data_config["input_size"], batch_size, params.features.engine
    )
    for split in SPLITS:
        rows = usable[usable["split"] == split]
        image_paths = [paths.data / p for p in rows["path"]]
        features = forward_in_batches(
            runner, image_paths, transform, batch_size, f"features {split}"
        )
        if len(rows) == 0:
            features = np.zeros((0, backbone.num_features), dtype=np.float32)
        feature_set = FeatureSet(
            features=features,
            labels=rows["label"].map(index_of).to_numpy(dtype=np.int64),
            paths=rows["path"].to_numpy(dtype=str),
            sha256=rows["sha256"].to_numpy(dtype=str),
        )
        save_feature_set(feature_set, paths.features / f"{split}.npz")
    spec = ModelSpec(
        backbone.name, backbone.weights, backbone.weights_sha256, backbone.data_config, labels
    )
    write_json(paths.features / "spec.json", asdict(spec))
    return spec


def load_spec(paths: ProjectPaths) -> ModelSpec:
    """The backbone and labels the cached features were made with."""
    return ModelSpec(**read_json(paths.features / "spec.json"))
