from pathlib import Path

import pytest

from graft.config import ParamsError, load_params, parse_params
from tests.conftest import REPO_ROOT


def test_the_repository_params_file_is_valid_and_uses_the_packaged_backbone():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.backbone.name == "tf_efficientnet_lite0"
    assert params.backbone.weights == "packaged"


def test_missing_sections_take_their_defaults():
    params = parse_params({"head": {"lr": 0.05}})
    assert params.head.lr == 0.05
    assert params.finetune.unfreeze_blocks == 1


def test_unknown_key_is_named_with_the_known_ones():
    with pytest.raises(ParamsError) as error:
        parse_params({"head": {"lrr": 0.1}})
    message = str(error.value)
    assert "unknown key 'head.lrr'" in message
    assert "lr" in message and "patience" in message


def test_unknown_section_is_named():
    with pytest.raises(ParamsError, match="unknown key 'hed'"):
        parse_params({"hed": {"lr": 0.1}})


def test_ill_typed_value_names_the_key_and_the_value():
    with pytest.raises(ParamsError) as error:
        parse_params({"head": {"lr": "fast"}})
    assert "key 'head.lr'" in str(error.value)
    assert "'fast'" in str(error.value)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"head": {"lr": 0}}, "head.lr"),
        ({"finetune": {"epochs": -1}}, "finetune.epochs"),
        ({"data": {"val_fraction": 0.5, "test_fraction": 0.45}}, "data.test_fraction"),
        ({"backbone": {"weights": "imagenet"}}, "backbone.weights"),
    ],
)
def test_out_of_range_values_are_refused(raw, key):
    with pytest.raises(ParamsError, match=f"key '{key}'"):
        parse_params(raw)


def test_missing_or_broken_file_says_what_to_do(tmp_path: Path):
    with pytest.raises(ParamsError, match="not found: run graft from the project root"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("head: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
