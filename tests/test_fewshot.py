"""Few-shot mode: validation of 1-5 images per class, the split rule, the head choice, export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from graft.classifier import build_head, load_checkpoint
from graft.config import DataParams, FewShotParams, load_params
from graft.data.manifest import build_manifest, give_every_class_a_train_image, read_manifest
from graft.features import load_feature_set
from graft.fewshot import finetune_skip_reason, l2_normalise, train_fewshot_head
from graft.files import read_json
from graft.sample_data import write_sample_data
from graft.serving.model import load_model
from graft.serving.predict import predict_files
from graft.stages import evaluate, export, features, finetune, train_head, validate
from graft.validate import DataValidationError
from graft.validate import validate as validate_data
from tests.conftest import make_project


@pytest.fixture(scope="module")
def three_per_class(tmp_path_factory):
    data = tmp_path_factory.mktemp("three") / "data"
    write_sample_data(data, per_class=3)
    return data


def test_three_images_per_class_are_refused_naming_the_keys_unless_few_shot(three_per_class):
    with pytest.raises(DataValidationError) as error:
        validate_data(three_per_class, DataParams(min_images_per_class=5))
    message = str(error.value)
    assert "data.min_images_per_class = 5" in message and "data.few_shot: true" in message

    result = validate_data(three_per_class, DataParams(min_images_per_class=5, few_shot=True))
    ok = result.manifest[result.manifest["status"] == "ok"]
    assert len(ok) == 30
    assert set(ok.loc[ok["split"] == "train", "label"]) == {str(d) for d in range(10)}


def test_few_shot_split_gives_each_class_a_train_image_and_moves_nothing_else(three_per_class):
    # Large held-out fractions leave some 3-image classes without a train image by hash alone.
    plain = build_manifest(three_per_class, DataParams(val_fraction=0.3, test_fraction=0.3))
    few = build_manifest(
        three_per_class, DataParams(val_fraction=0.3, test_fraction=0.3, few_shot=True)
    )
    trained = set(plain.loc[plain["split"] == "train", "label"])
    orphans = {str(d) for d in range(10)} - trained
    assert orphans, "the data no longer has a class without train images: pick other fractions"
    assert set(few.loc[few["split"] == "train", "label"]) == {str(d) for d in range(10)}
    moved = few[few["split"] != plain["split"]]
    assert sorted(moved["label"]) == sorted(orphans)  # one image per orphan class, no other
    assert (moved["split"] == "train").all()


def test_split_folders_are_never_rearranged():
    manifest = pd.DataFrame(
        {
            "path": ["test/a/1.png", "train/b/2.png"],
            "label": ["a", "b"],
            "split": ["test", "train"],
            "sha256": ["0" * 64, "1" * 64],
            "status": ["ok", "ok"],
        }
    )
    movable = pd.Series([False, True], index=manifest["path"])
    result = give_every_class_a_train_image(manifest.copy(), 42, movable)
    assert list(result["split"]) == ["test", "train"]  # class a stays without train: refused later


def tight_and_diffuse(rng: np.random.Generator, per_class: int, dims: int = 16):
    """Class 0 sits tightly around one direction, class 1 spreads widely around another.

    Nearest normalised class mean (the prototypes) separates them; a heavily regularised
    linear probe behaves like unnormalised means, so the tight class pulls the diffuse class's
    images over.
    """
    tight, diffuse = np.zeros(dims), np.zeros(dims)
    tight[0], diffuse[0], diffuse[1] = 1.0, 0.5, np.sqrt(0.75)
    x = np.vstack(
        [
            tight + 0.05 * rng.standard_normal((per_class, dims)),
            diffuse + 0.4 * rng.standard_normal((per_class, dims)),
        ]
    )
    return x.astype(np.float32), np.repeat([0, 1], per_class)


def tilted_noise(rng: np.random.Generator, per_class: int, dims: int = 8):
    """Classes differ along u, but a large shared noise runs along u + v: only a discriminative
    probe learns to look across the noise; the class means point straight into it."""
    base, u, v = np.zeros(dims), np.zeros(dims), np.zeros(dims)
    base[0], u[1], v[2] = 3.0, 1.0, 1.0
    y = np.repeat([0, 1], per_class)
    noise = rng.standard_normal(2 * per_class)[:, None] * (u + v) / np.sqrt(2)
    x = base + np.where(y == 0, -0.3, 0.3)[:, None] * u + noise
    return (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32), y


def test_prototype_head_is_used_when_it_wins():
    rng = np.random.default_rng(0)
    train_x, train_y = tight_and_diffuse(rng, 5)
    val_x, val_y = tight_and_diffuse(rng, 10)
    result = train_fewshot_head(train_x, train_y, val_x, val_y, 2, FewShotParams(probe_c=0.001))
    choice = result.architecture["few_shot"]
    assert result.architecture["kind"] == "l2_linear"
    assert choice["winner"] == "prototype" and choice["method"] == "val"
    assert choice["prototype_accuracy"] > choice["probe_accuracy"]
    # The head is the prototypes: on fresh images it predicts the nearest normalised class mean.
    means = l2_normalise(np.stack([l2_normalise(train_x[train_y == c]).mean(0) for c in (0, 1)]))
    fresh_x, _ = tight_and_diffuse(rng, 50)
    with torch.no_grad():
        predicted = result.head(torch.from_numpy(fresh_x)).argmax(1).numpy()
    assert (predicted == (l2_normalise(fresh_x) @ means.T).argmax(1)).all()


def test_regularised_probe_is_used_when_it_wins():
    rng = np.random.default_rng(0)
    train_x, train_y = tilted_noise(rng, 5)
    val_x, val_y = tilted_noise(rng, 20)
    result = train_fewshot_head(train_x, train_y, val_x, val_y, 2, FewShotParams(probe_c=100.0))
    choice = result.architecture["few_shot"]
    assert choice["winner"] == "probe"
    assert choice["probe_accuracy"] > choice["prototype_accuracy"] + 0.1


def test_a_tiny_val_split_makes_the_choice_by_leave_one_out():
    rng = np.random.default_rng(1)
    train_x, train_y = tight_and_diffuse(rng, 3)
    empty = np.zeros((0, train_x.shape[1]), np.float32)
    result = train_fewshot_head(
        train_x, train_y, empty, np.zeros(0, np.int64), 2, FewShotParams(probe_c=0.001)
    )
    choice = result.architecture["few_shot"]
    assert choice["method"] == "leave-one-out" and choice["held_out_images"] == 6
    assert choice["fit_on"] == "train+val"


def test_fine_tuning_is_skipped_only_in_few_shot_mode(tmp_path):
    paths = make_project(tmp_path / "p", per_class=12)
    validate.main(paths.root)
    manifest = read_manifest(paths.manifest)
    assert finetune_skip_reason(manifest, load_params(paths.params)) is None
    paths.params.write_text(paths.params.read_text().replace("few_shot: false", "few_shot: true"))
    reason = finetune_skip_reason(manifest, load_params(paths.params))
    assert reason and "fewshot.finetune_min_images_per_class = 20" in reason
    assert finetune_skip_reason(paths.manifest, load_params(paths.params)) == reason


def test_a_few_shot_run_exports_a_model_that_answers_like_its_head(tmp_path):
    paths = make_project(
        tmp_path / "p",
        per_class=3,
        overrides={
            "data": {"few_shot": True, "min_images_per_class": 5, "test_fraction": 0.3},
            "export": {"int8": False},
        },
    )
    for stage in (validate, features, train_head, finetune, evaluate, export):
        stage.main(paths.root)
    head_metrics = read_json(paths.metrics / "head.json")
    assert head_metrics["kind"] == "l2_linear"
    assert head_metrics["few_shot"]["winner"] in {"prototype", "probe"}
    assert read_json(paths.metrics / "finetune.json")["skipped"] is True
    assert read_json(paths.blessing)["candidate"] == "head"

    checkpoint = load_checkpoint(paths.head_model)
    served = load_model(paths.onnx_model)
    assert list(served.labels) == checkpoint.spec.labels
    for split in ("train", "test"):
        cached = load_feature_set(paths.features / f"{split}.npz")
        head = build_head(checkpoint, cached.features.shape[1])
        with torch.no_grad():
            expected = head(torch.from_numpy(cached.features)).argmax(1).numpy()
        rows = predict_files(
            served, [paths.data / p for p in cached.paths], top_k=1, show_progress=False
        )
        answered = [served.labels.index(row.prediction.label) for row in rows]
        assert answered == list(expected)
        if split == "train":  # the images the head was fit on
            assert np.mean(np.array(answered) == cached.labels) >= 0.6
