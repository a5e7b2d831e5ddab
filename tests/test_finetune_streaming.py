"""Fine-tuning with the frozen prefix's activations over ``finetune.prefix_memory_mb``: they are
streamed from disk shards, training still learns, the scratch is gone afterwards (also after a
failure), a streamed val scores what an in-memory val scores, and a streamed run resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import graft.finetune as finetune_module
from graft.activation_shards import ShardedActivations
from graft.backbones import create_backbone
from graft.config import FinetuneParams
from graft.files import read_json
from graft.stages import features, train_head, validate
from graft.stages import finetune as finetune_stage
from tests.conftest import write_params
from tests.test_finetune import run as finetune_run

ROW_MB = 48 * 10 * 10 * 4 / 2**20  # test_efficientnet below its top block, one image


@pytest.fixture(scope="module")
def bright_or_dark(tmp_path_factory) -> dict:
    """An easy, separable task: noisy dark images against noisy bright ones."""
    folder = tmp_path_factory.mktemp("streaming")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for index in range(48):
        label = index % 2
        pixels = rng.normal(60 + 130 * label, 30, size=(40, 40, 3)).clip(0, 255)
        path = folder / f"{index:03d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(path)
        labels.append(label)
    labels = np.array(labels)
    torch.manual_seed(0)
    backbone = create_backbone("test_efficientnet", "random", num_classes=2)
    return {
        "train": (paths[:32], labels[:32]),
        "val": (paths[32:], labels[32:]),
        "model": backbone.model,
        "data_config": backbone.data_config,
    }


def settings(**overrides) -> FinetuneParams:
    base = {"unfreeze_blocks": 1, "epochs": 3, "batch_size": 8, "lr": 0.01, "patience": 10}
    return FinetuneParams(**{**base, **overrides})


def run(task, params: FinetuneParams, scratch: Path, **kwargs):
    """tests/test_finetune.py's run on ``task``, its scratch in ``scratch``: the result."""
    return finetune_run(task, params, scratch_dir=scratch, **kwargs)[0]


def streamed_stores(monkeypatch) -> list[ShardedActivations]:
    """Every sharded store the runs make from now on."""
    made: list[ShardedActivations] = []
    store = finetune_module.store_activations

    def recorded(*args, **kwargs):
        stored = store(*args, **kwargs)
        if stored.streamed:
            made.append(stored)
        return stored

    monkeypatch.setattr(finetune_module, "store_activations", recorded)
    return made


def test_a_split_over_the_budget_is_streamed_and_training_still_learns(
    bright_or_dark, tmp_path, monkeypatch
):
    stores = streamed_stores(monkeypatch)
    budget_mb = 24 * ROW_MB  # 32 train images and 16 val images do not fit; 24 rows do
    result = run(bright_or_dark, settings(prefix_memory_mb=budget_mb), tmp_path / "scratch")
    assert result.prefix["streamed"] and result.prefix["disk_mb_peak"] > 0
    assert {name: split["streamed"] for name, split in result.prefix["splits"].items()} == {
        "val, top 1": False,
        "train, top 1": True,
    }
    (train,) = stores
    assert len(train) == 32 and train.shards >= 4
    assert 0 < train.max_resident_rows * ROW_MB <= budget_mb  # the working set kept the budget
    assert result.head_val_accuracy < 0.8 <= result.val_accuracy  # it learnt the easy task
    assert not any((tmp_path / "scratch").iterdir())  # the shards are gone


def test_streamed_val_scores_what_val_in_memory_scores(bright_or_dark, tmp_path):
    untrained = settings(epochs=0)  # the head alone: only the val logits
    in_memory = run(bright_or_dark, untrained, tmp_path / "a")
    streamed = run(
        bright_or_dark,
        untrained.model_copy(update={"prefix_memory_mb": ROW_MB * 9}),
        tmp_path / "b",
    )
    assert not in_memory.prefix["streamed"] and streamed.prefix["streamed"]
    torch.testing.assert_close(streamed.val_logits, in_memory.val_logits, atol=1e-5, rtol=1e-5)


class Killed(Exception):
    """Stands for a failure in the middle of training."""


def test_a_streamed_run_leaves_no_scratch_after_a_failure_and_resumes(
    bright_or_dark, tmp_path, monkeypatch
):
    params = settings(
        prefix_memory_mb=ROW_MB * 20,
        epochs=3,
        bn="adapt",  # recalibration streams train again
        augment={"enabled": True, "scale": [0.6, 1.0]},  # each epoch's shards written anew
    )
    scratch = tmp_path / "scratch"
    uninterrupted = run(bright_or_dark, params, scratch, checkpoint_dir=tmp_path / "a")
    assert uninterrupted.prefix["streamed"]
    train_epoch = finetune_module._PolicyRun.train_epoch

    def failing_in_epoch_2(self, top, optimizer, scheduler, train_h, epoch, *rest):
        if epoch == 2:
            assert train_h.streamed and any(scratch.rglob("*.npz"))  # mid-stream
            raise Killed
        return train_epoch(self, top, optimizer, scheduler, train_h, epoch, *rest)

    with monkeypatch.context() as patched:
        patched.setattr(finetune_module._PolicyRun, "train_epoch", failing_in_epoch_2)
        with pytest.raises(Killed):
            run(bright_or_dark, params, scratch, checkpoint_dir=tmp_path / "b")
    assert not any(scratch.iterdir())
    resumed = run(bright_or_dark, params, scratch, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_at_epoch == 1
    assert len(resumed.history) == len(uninterrupted.history) == 4
    for mine, theirs in zip(resumed.history, uninterrupted.history, strict=True):
        assert mine["val_accuracy"] == pytest.approx(theirs["val_accuracy"], abs=1e-6)
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)
    for key, value in uninterrupted.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, atol=1e-4, rtol=1e-4)


def test_the_stage_reports_streaming_and_leaves_no_scratch(tiny_project, capsys):
    write_params(tiny_project.root, {"finetune": {"epochs": 1, "prefix_memory_mb": 0.5}})
    for stage in (validate, features, train_head, finetune_stage):
        stage.main(tiny_project.root)
    prefix = read_json(tiny_project.metrics / "finetune.json")["prefix"]
    assert prefix["streamed"] and prefix["memory_budget_mb"] == 0.5 and prefix["disk_mb_peak"] > 0
    assert (
        prefix["splits"]["train, top 2"]["streamed"] and prefix["splits"]["val, top 2"]["streamed"]
    )
    assert (
        "frozen prefix streamed from disk shards (val, top 2; train, top 2;"
        in capsys.readouterr().out
    )
    scratch = finetune_stage.scratch_dir(tiny_project)
    assert scratch.is_relative_to(tiny_project.root / ".graft") and not any(scratch.iterdir())
