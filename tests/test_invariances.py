"""Augmentation from the invariances a user declares (data.invariances)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from graft.config import ParamsError, parse_params
from graft.files import read_json
from graft.finetune import RandomInvariance
from graft.sample_data import digit_images
from graft.stages import features, finetune, train_head, validate
from tests.conftest import write_params


def _digit() -> Image.Image:
    _, _, png = digit_images(per_class=1)[3]
    return Image.open(io.BytesIO(png)).convert("RGB")


def _variants(invariances: list[str], draws: int = 200) -> set[bytes]:
    random.seed(0)
    draw = RandomInvariance(invariances)
    return {np.asarray(draw(_digit())).tobytes() for _ in range(draws)}


def _dihedral(image: Image.Image) -> set[bytes]:
    array = np.asarray(image)
    turns = [np.rot90(array, k) for k in range(4)]
    return {np.ascontiguousarray(a).tobytes() for t in turns for a in (t, t[:, ::-1])}


def test_every_draw_is_an_exact_symmetry_of_the_image_and_all_eight_occur():
    assert _variants(["hflip", "vflip", "rot90"]) == _dihedral(_digit())


def test_only_the_declared_invariances_are_drawn():
    assert _variants([]) == {np.asarray(_digit()).tobytes()}
    flipped = np.ascontiguousarray(np.asarray(_digit())[:, ::-1]).tobytes()
    assert _variants(["hflip"]) == {np.asarray(_digit()).tobytes(), flipped}
    assert len(_variants(["rot90"])) == 4


def test_an_unknown_invariance_is_refused_naming_the_key():
    assert parse_params({"data": {"invariances": ["hflip", "rot90"]}}).data.invariances == [
        "hflip",
        "rot90",
    ]
    with pytest.raises(ParamsError, match="data.invariances"):
        parse_params({"data": {"invariances": ["rot45"]}})


def test_fine_tuning_trains_on_the_declared_invariances(tiny_project):
    write_params(
        tiny_project.root, {"data": {"invariances": ["hflip", "rot90"]}, "finetune": {"epochs": 1}}
    )
    for stage in (validate, features, train_head, finetune):
        stage.main(tiny_project.root)
    tuned = read_json(tiny_project.metrics / "finetune.json")
    assert tuned["invariances"] == ["hflip", "rot90"] and tuned["epochs_run"] == 1
