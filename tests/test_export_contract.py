"""What an exported model promises a client: parity that scales with the logits, the uint8-input
variant equal to the float pipeline on real images, labels.txt, model_version and doc_string."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from graft.backbones import create_backbone
from graft.export import check_parity, export_onnx, parity_on_images
from graft.files import read_json
from graft.portable import PortableGraphError, uint8_nhwc_variant
from graft.preprocessing import eval_transform, load_rgb, load_tensor_batch, resize_and_crop
from graft.runtime import inference_session, run_single
from graft.sample_data import write_sample_data
from tests.test_stages import run_until

PARITY_LIMIT = 1e-4  # export.parity_max_relative_logit's default


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny classifier with large logits (its last Linear scaled up), real digit images."""
    folder = tmp_path_factory.mktemp("contract")
    write_sample_data(folder / "data", per_class=2)
    backbone = create_backbone("test_efficientnet", "random", num_classes=10)
    model = backbone.model.eval()
    images = sorted((folder / "data").rglob("*.png"))
    with torch.no_grad():  # logits of a few hundred, as after fine-tuning with calibration
        largest = model(load_tensor_batch(images, eval_transform(backbone.data_config))).abs().max()
        model.get_classifier().weight.mul_(300.0 / float(largest))
        model.get_classifier().bias.mul_(300.0 / float(largest))
    path = export_onnx(model, backbone.data_config.input_size, folder / "model.onnx")
    return model, backbone.data_config, images, path


def test_float_noise_on_large_logits_passes_parity_and_a_real_mismatch_fails(tiny, tmp_path):
    model, config, images, path = tiny
    parity, logits = parity_on_images(model, path, images, eval_transform(config))
    assert np.abs(logits).max() > 100  # large logits, as after fine-tuning and calibration
    assert parity.within(PARITY_LIMIT, 1.0), parity
    # The same logits with float32-sized noise (1e-6 relative): more than the old absolute
    # limit of 1e-4 in a logit, still the same model.
    noisy = logits * (1 + 1e-6 * np.sign(np.sin(np.arange(logits.size)).reshape(logits.shape)))
    benign = check_parity(logits, noisy.astype(np.float32))
    assert benign.max_abs_logit_diff > 1e-4 and benign.within(PARITY_LIMIT, 1.0)
    # A real mismatch: the ONNX file of a model with one convolution 1% off.
    other = create_backbone("test_efficientnet", "random", num_classes=10).model.eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        next(m for m in other.modules() if isinstance(m, torch.nn.Conv2d)).weight.mul_(1.01)
    wrong = export_onnx(other, config.input_size, tmp_path / "wrong.onnx")
    mismatch, _ = parity_on_images(model, wrong, images, eval_transform(config))
    assert not mismatch.within(PARITY_LIMIT, 0.0), mismatch


def test_the_uint8_variant_equals_the_float_pipeline_on_real_images(tiny, tmp_path):
    _, config, images, path = tiny
    variant = uint8_nhwc_variant(onnx.load(str(path)), config.mean, config.std)
    (given,) = variant.graph.input
    assert given.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_value or d.dim_param for d in given.type.tensor_type.shape.dim]
    assert dims == ["batch", *config.input_size[1:], 3]  # NHWC at the model's size
    onnx.save(variant, str(tmp_path / "portable.onnx"))
    pixels = np.stack([resize_and_crop(config)(load_rgb(image)) for image in images])
    assert pixels.dtype == np.uint8
    portable = inference_session(tmp_path / "portable.onnx").run(None, {"image": pixels})[0]
    float_model = run_single(
        inference_session(path), load_tensor_batch(images, eval_transform(config)).numpy()
    )
    np.testing.assert_allclose(portable, float_model, atol=1e-4, rtol=0)


def test_a_model_without_one_float_image_input_cannot_take_uint8(tiny):
    _, config, _, path = tiny
    variant = uint8_nhwc_variant(onnx.load(str(path)), config.mean, config.std)
    with pytest.raises(PortableGraphError, match="float32 image input"):
        uint8_nhwc_variant(variant, config.mean, config.std)


def test_every_export_has_labels_a_version_a_doc_string_and_a_portable_twin(tiny_project):
    run_until(tiny_project, "export")
    labels = [str(d) for d in range(10)]
    models = tiny_project.onnx_model.parent
    exported = read_json(tiny_project.metrics / "export.json")
    for folder in (models, models / "portable"):
        assert (folder / "labels.txt").read_text().splitlines() == labels
        proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        assert proto.model_version == exported["model_version"] > 0
        assert "labels" in proto.doc_string and "softmax" in proto.doc_string
    assert "uint8" in onnx.load(str(models / "portable" / "model.onnx")).doc_string
    assert exported["portable"]["made"] and exported["portable"]["max_abs_logit_diff"] <= 1e-4
    decision = read_json(tiny_project.int8_dir / "decision.json")
    assert decision["calibration_method"] in decision["calibration_methods_on_val"]
    int8_files = {p.name for p in tiny_project.int8_dir.iterdir()}
    assert int8_files == (
        {"decision.json", "model.onnx", "labels.txt"} if decision["kept"] else {"decision.json"}
    )
