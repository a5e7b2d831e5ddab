"""The probability average of the head and the fine-tuned model, as one exported ONNX graph."""

from __future__ import annotations

import numpy as np
import timm
import torch

from graft.data_config import DataConfig
from graft.ensemble import ProbabilityAverage, average_probabilities
from graft.export import export_onnx
from graft.numeric import softmax
from graft.preprocessing import eval_transform, load_tensor_batch
from graft.runtime import inference_session, run_single
from graft.sample_data import write_sample_data


def test_the_exported_average_serves_the_members_mean_probability(tmp_path):
    torch.manual_seed(0)
    members = [timm.create_model("test_efficientnet", num_classes=10).eval() for _ in range(2)]
    write_sample_data(tmp_path / "digits", per_class=2)
    images = sorted((tmp_path / "digits").rglob("*.png"))
    config = DataConfig.from_dict(timm.data.resolve_data_config({}, model=members[0]))
    batch = load_tensor_batch(images, eval_transform(config))  # real images, not noise
    with torch.no_grad():
        each = [m(batch).softmax(dim=1).numpy() for m in members]
    by_hand = average_probabilities(each)
    path = export_onnx(ProbabilityAverage(members), config.input_size, tmp_path / "m.onnx")
    served = softmax(run_single(inference_session(path), batch.numpy()))  # as graft serve does
    np.testing.assert_allclose(served, by_hand, atol=1e-5)
    assert not np.allclose(served, each[0], atol=1e-3)  # both members count
