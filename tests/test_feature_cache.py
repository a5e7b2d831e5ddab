"""The content-addressed feature cache: cold, warm, incremental, killed, corrupt, on Dask."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import graft.preprocessing
from graft.config import BackboneParams, DataParams, FeaturesParams
from graft.data.manifest import build_manifest
from graft.data.splits import SPLITS
from graft.embedding import embed
from graft.engines import make_runner
from graft.feature_cache import CorruptShardWarning, FeatureCache
from graft.features import forward_in_batches
from graft.preprocessing import eval_transform
from graft.sample_data import write_sample_data

TINY = BackboneParams(name="test_efficientnet", weights="random")
SHARD = 8
PARAMS = FeaturesParams(batch_size=4, shard_size=SHARD)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """60 real digit scans and their manifest rows (the usable ones)."""
    data = tmp_path_factory.mktemp("cache") / "data"
    write_sample_data(data, per_class=6)
    manifest = build_manifest(data, DataParams(min_images_per_class=1))
    return manifest[manifest["status"] == "ok"].reset_index(drop=True), data


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts every image decoded for embedding (the one decoder the pipeline calls)."""
    count = [0]
    real = graft.preprocessing.load_rgb

    def counting(source):
        count[0] += 1
        return real(source)

    monkeypatch.setattr(graft.preprocessing, "load_rgb", counting)
    return count


def assert_same_features(left: dict, right: dict, atol: float = 0.0) -> None:
    for split in SPLITS:
        np.testing.assert_array_equal(left[split].paths, right[split].paths)
        np.testing.assert_array_equal(left[split].labels, right[split].labels)
        np.testing.assert_allclose(left[split].features, right[split].features, atol=atol)


def test_cold_run_embeds_every_image_in_shards_and_matches_the_engine(digits, tmp_path, decodes):
    rows, data = digits
    result = embed(rows, data, TINY, PARAMS, tmp_path / "cache")
    assert result.report.computed == len(rows) == decodes[0]
    assert result.report.reused == 0
    cache = FeatureCache(tmp_path / "cache", result.key)
    assert len(cache.shard_paths()) == math.ceil(len(rows) / SHARD) == result.report.shards_written
    assert cache.onnx_path.is_file()  # the exported engine is kept for the next run
    sets = result.feature_sets
    assert sum(len(sets[split]) for split in SPLITS) == len(rows)
    train = rows[rows["split"] == "train"]
    assert list(sets["train"].paths) == list(train["path"])
    assert [result.labels[i] for i in sets["train"].labels] == list(train["label"])
    # The same images run straight through the engine, without any cache.
    backbone = result.backbone
    runner = make_runner(backbone.model, backbone.data_config.input_size, 4, "torch")
    fresh = forward_in_batches(
        runner, [data / p for p in train["path"]], eval_transform(backbone.data_config), 4, "t"
    )
    np.testing.assert_allclose(sets["train"].features, fresh, atol=1e-4)


def test_warm_run_decodes_no_image_and_gives_the_same_matrices(digits, tmp_path, decodes):
    rows, data = digits
    cold = embed(rows, data, TINY, PARAMS, tmp_path / "cache")
    decodes[0] = 0
    warm = embed(rows, data, TINY, PARAMS, tmp_path / "cache")
    assert decodes[0] == 0
    assert (warm.report.computed, warm.report.reused) == (0, len(rows))
    assert_same_features(warm.feature_sets, cold.feature_sets)


def test_new_images_are_the_only_ones_computed(digits, tmp_path, decodes):
    rows, data = digits
    new = rows.sample(3, random_state=0).index
    embed(rows.drop(index=new), data, TINY, PARAMS, tmp_path / "cache")
    decodes[0] = 0
    grown = embed(rows, data, TINY, PARAMS, tmp_path / "cache")
    assert grown.report.computed == decodes[0] == 3
    assert grown.report.reused == len(rows) - 3
    fresh = embed(rows, data, TINY, PARAMS, tmp_path / "fresh")
    assert_same_features(grown.feature_sets, fresh.feature_sets, atol=1e-5)


def test_removed_images_leave_the_split_matrices(digits, tmp_path, decodes):
    rows, data = digits
    embed(rows, data, TINY, PARAMS, tmp_path / "cache")
    removed = rows[rows["split"] == "train"].iloc[:4]
    decodes[0] = 0
    shrunk = embed(rows.drop(index=removed.index), data, TINY, PARAMS, tmp_path / "cache")
    assert decodes[0] == 0
    train = shrunk.feature_sets["train"]
    assert not set(removed["path"]) & set(train.paths)
    assert len(train) == (rows["split"] == "train").sum() - 4 == len(train.features)


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
import pandas as pd
from graft.config import BackboneParams, FeaturesParams
from graft.embedding import embed

rows = pd.read_csv(sys.argv[1], dtype=str, keep_default_na=False)
written = []

def after_shard(path):
    written.append(path)
    if len(written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind, as with a power cut

embed(rows, Path(sys.argv[2]), BackboneParams(name="test_efficientnet", weights="random"),
      FeaturesParams(batch_size=4, shard_size=8), Path(sys.argv[3]), on_shard=after_shard)
"""


def test_a_killed_run_resumes_from_its_completed_shards(digits, tmp_path, decodes):
    rows, data = digits
    rows.to_csv(tmp_path / "rows.csv", index=False)
    cache_dir = tmp_path / "cache"
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_RUN), tmp_path / "rows.csv", data, cache_dir],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list(cache_dir.rglob("shards/*.npz"))) == 2
    decodes[0] = 0
    resumed = embed(rows, data, TINY, PARAMS, cache_dir)
    assert resumed.report.reused == 2 * SHARD
    assert resumed.report.computed == decodes[0] == len(rows) - 2 * SHARD
    fresh = embed(rows, data, TINY, PARAMS, tmp_path / "fresh")
    assert_same_features(resumed.feature_sets, fresh.feature_sets, atol=1e-5)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _alter_a_value(path: Path) -> None:
    """A well-formed archive whose numbers changed after its checksum was taken."""
    with np.load(path) as archive:
        content = dict(archive)
    content["features"][0, 0] += 1.0
    with open(path, "wb") as handle:
        np.savez(handle, **content)


@pytest.mark.parametrize("damage", [_truncate, _alter_a_value])
def test_a_corrupt_shard_is_reported_and_recomputed(digits, tmp_path, decodes, damage):
    rows, data = digits
    cold = embed(rows, data, TINY, PARAMS, tmp_path / "cache")
    shard = next(
        path
        for path in FeatureCache(tmp_path / "cache", cold.key).shard_paths()
        if len(np.load(path)["sha256"]) == SHARD
    )
    damage(shard)
    decodes[0] = 0
    with pytest.warns(CorruptShardWarning, match=shard.name):
        repaired = embed(rows, data, TINY, PARAMS, tmp_path / "cache")
    assert repaired.report.computed == decodes[0] == SHARD
    assert_same_features(repaired.feature_sets, cold.feature_sets, atol=1e-5)
    with np.load(shard) as archive:  # rewritten whole, under the same content address
        assert len(archive["sha256"]) == SHARD


def test_an_altered_engine_file_is_reported_and_exported_again(digits, tmp_path, decodes):
    """An engine that still loads but computes something else would poison every new shard."""
    import onnx
    from onnx import numpy_helper

    rows, data = digits
    new = rows.sample(3, random_state=1).index
    cold = embed(rows.drop(index=new), data, TINY, PARAMS, tmp_path / "cache")
    engine = FeatureCache(tmp_path / "cache", cold.key).onnx_path
    model = onnx.load(str(engine))
    weights = max(model.graph.initializer, key=lambda tensor: np.prod(tensor.dims))
    altered = numpy_helper.to_array(weights) * 2.0
    weights.CopyFrom(numpy_helper.from_array(altered, weights.name))
    onnx.save(model, str(engine))

    with pytest.warns(CorruptShardWarning, match="backbone.onnx"):
        grown = embed(rows, data, TINY, PARAMS, tmp_path / "cache")
    fresh = embed(rows, data, TINY, PARAMS, tmp_path / "fresh")
    assert_same_features(grown.feature_sets, fresh.feature_sets, atol=1e-5)


def test_another_precision_or_preprocessing_is_another_key(digits, tmp_path):
    rows, data = digits
    fp32 = embed(rows, data, TINY, PARAMS, tmp_path / "cache")
    int8 = embed(rows, data, fp32.backbone, PARAMS, tmp_path / "cache", precision="int8")
    assert int8.report.computed == len(rows) and int8.report.calibrated
    assert int8.key.digest() != fp32.key.digest()
    assert not np.array_equal(
        int8.feature_sets["train"].features, fp32.feature_sets["train"].features
    )
    backbone = fp32.backbone
    other = replace(backbone, data_config=replace(backbone.data_config, crop_pct=0.5))
    assert embed(rows, data, other, PARAMS, tmp_path / "cache").report.computed == len(rows)


def test_a_two_worker_local_cluster_gives_the_in_process_result(digits, tmp_path):
    rows, data = digits
    local = embed(rows, data, TINY, PARAMS, tmp_path / "local")
    on_dask = embed(rows, data, TINY, PARAMS.model_copy(update={"workers": 2}), tmp_path / "dask")
    assert on_dask.report.where == "dask"
    assert on_dask.report.computed == len(rows)
    assert_same_features(on_dask.feature_sets, local.feature_sets, atol=1e-6)
    # The client wrote the same shards, so either cache serves the other's runs.
    names = {path.name for path in (tmp_path / "local").rglob("shards/*.npz")}
    assert names == {path.name for path in (tmp_path / "dask").rglob("shards/*.npz")}
