"""``backbone.name: auto``: the features stage ranks the candidates by a quick cross-validated
probe, uses the winner and records the ranking; a candidate over the time budget is skipped."""

from __future__ import annotations

import warnings

from graft.classifier import read_spec
from graft.feature_cache import CorruptShardWarning
from graft.files import read_json
from graft.stages import features, validate
from tests.conftest import make_project, write_params

CANDIDATES = ["test_efficientnet", "test_resnet"]


def test_auto_ranks_the_candidates_uses_the_winner_and_skips_one_over_budget(tmp_path):
    auto = {"name": "auto", "weights": "random", "auto_candidates": CANDIDATES}
    paths = make_project(tmp_path / "project", overrides={"backbone": auto})
    validate.main(paths.root)
    with warnings.catch_warnings():  # timing a candidate leaves the cache's engine files alone
        warnings.simplefilter("error", CorruptShardWarning)
        features.main(paths.root)
    ranked = read_json(paths.metrics / "features.json")["auto_backbone"]
    assert sorted(entry["name"] for entry in ranked["ranking"]) == sorted(CANDIDATES)
    best = ranked["ranking"][0]
    assert ranked["chosen"] == best["name"]
    assert best["cv_accuracy"] >= ranked["ranking"][1]["cv_accuracy"]
    assert best["images"] > 0 and best["ms_per_image"] > 0
    assert set(ranked["within_noise"]) == set(CANDIDATES) - {best["name"]}
    assert read_spec(paths.features / "spec.json").backbone == ranked["chosen"]  # used

    write_params(paths.root, {"backbone": {**auto, "auto_max_minutes": 1e-6}})
    features.main(paths.root)
    ranked = read_json(paths.metrics / "features.json")["auto_backbone"]
    assert [entry["name"] for entry in ranked["ranking"]] == CANDIDATES[:1]  # the first runs
    assert [entry["name"] for entry in ranked["skipped"]] == CANDIDATES[1:]
    assert read_spec(paths.features / "spec.json").backbone == CANDIDATES[0]
