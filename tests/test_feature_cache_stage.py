"""The features stage on the cache: what `dvc repro` sees, and the INT8 gate's decision."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graft.embedding
from graft.features import load_feature_set
from graft.files import read_json
from graft.stages import features, validate
from tests.conftest import write_params


@pytest.fixture
def validated(tiny_project):
    validate.main(tiny_project.root)
    return tiny_project


def test_a_rerun_after_dvc_deleted_the_outputs_is_served_by_the_cache(validated):
    features.main(validated.root)
    first = {s: load_feature_set(validated.features / f"{s}.npz") for s in ("train", "val")}
    cold = read_json(validated.metrics / "features.json")
    assert cold["fp32_computed"] == cold["fp32_images"] > 0
    assert any((validated.root / ".graft" / "cache" / "features").rglob("shards/*.npz"))
    shutil.rmtree(validated.features)  # what `dvc repro` does before re-running the stage
    features.main(validated.root)
    warm = read_json(validated.metrics / "features.json")
    assert (warm["fp32_computed"], warm["fp32_reused"]) == (0, cold["fp32_images"])
    for split, before in first.items():
        after = load_feature_set(validated.features / f"{split}.npz")
        np.testing.assert_array_equal(after.features, before.features)
        np.testing.assert_array_equal(after.paths, before.paths)


def _quantizer_that_loses_everything(fp32_onnx, out_path, batches, **_):
    """An INT8 engine whose embeddings are all zero: a head on them can only guess one class."""
    model = onnx.load(str(fp32_onnx))
    (output,) = model.graph.output
    for node in model.graph.node:
        node.output[:] = [f"{name}_real" if name == output.name else name for name in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    model.graph.node.append(helper.make_node("Mul", [f"{output.name}_real", "zero"], [output.name]))
    onnx.save(model, str(out_path))
    return out_path


@pytest.mark.parametrize(
    ("max_drop", "accepted"),
    # Refused: an INT8 engine that loses everything scores the share of one class on val, far
    # below the fp32 head, whatever the CPU's INT8 kernels do (no chance involved).
    [(100.0, True), (0.5, False)],
)
def test_int8_features_are_used_only_within_the_val_accuracy_margin(
    validated, capsys, monkeypatch, max_drop, accepted
):
    if not accepted:
        monkeypatch.setattr(
            graft.embedding, "quantize_static_qdq", _quantizer_that_loses_everything
        )
    write_params(validated.root, {"features": {"precision": "int8", "int8_max_val_drop": max_drop}})
    features.main(validated.root)
    metrics = read_json(validated.metrics / "features.json")
    gate = metrics["int8_gate"]
    assert gate["accepted"] is accepted
    assert metrics["precision"] == ("int8" if accepted else "fp32")
    assert gate["drop_points"] == pytest.approx(
        100 * (gate["fp32_val_accuracy"] - gate["int8_val_accuracy"])
    )
    out = capsys.readouterr().out
    assert ("INT8 accepted" in out) is accepted
    if not accepted:
        assert "INT8 refused" in out and "int8_max_val_drop" in out
    # The matrices train_head reads are the chosen precision's.
    train = load_feature_set(validated.features / "train.npz").features
    cache = validated.root / ".graft" / "cache" / "features"
    keys = {read_json(p)["precision"]: p.parent for p in cache.glob("*/key.json")}
    assert set(keys) == {"fp32", "int8"}
    cached = {
        precision: np.concatenate([np.load(p)["features"] for p in sorted(folder.glob("shards/*"))])
        for precision, folder in keys.items()
    }
    chosen = metrics["precision"]
    assert any(np.allclose(train[0], row) for row in cached[chosen])
    other = "fp32" if chosen == "int8" else "int8"
    assert not any(np.array_equal(train[0], row) for row in cached[other])
