"""The grafted classifier (backbone + head) and its checkpoint files.

A checkpoint holds tensors and plain values only, so it loads with ``weights_only=True``:
``kind`` is ``head`` (the head's weights, on top of the recorded pretrained backbone) or
``full`` (every weight of the fine-tuned model). ``info["head"]`` describes the head's
architecture (see ``graft.head.make_head``); without it the head is the timm model's own linear
classifier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import nn

from graft.backbones import WeightsError, create_backbone
from graft.data_config import DataConfig
from graft.errors import GraftError, MissingInputError
from graft.files import read_json, replacing, write_json
from graft.head import make_head

CHECKPOINT_FORMAT = "graft.classifier/1"
Kind = Literal["head", "full"]


class CheckpointError(GraftError):
    """A model file is missing, foreign, or does not fit the backbone it names."""


@dataclass(frozen=True)
class ModelSpec:
    """What must travel with a model so that anyone can rebuild and feed it."""

    backbone: str
    weights: str
    weights_sha256: str | None
    data_config: DataConfig
    labels: list[str]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (in spec.json and every checkpoint)."""
        return {**asdict(self), "data_config": self.data_config.as_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        return cls(**{**values, "data_config": DataConfig.from_dict(values["data_config"])})


@dataclass(frozen=True)
class Checkpoint:
    spec: ModelSpec
    kind: Kind
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any]


def write_spec(path: Path, spec: ModelSpec) -> None:
    """Write ``spec`` as JSON (``artifacts/features/spec.json``: what the features come from)."""
    write_json(path, spec.as_dict())


def read_spec(path: Path) -> ModelSpec:
    """The spec :func:`write_spec` wrote.

    Raises:
        MissingInputError: if ``path`` does not exist yet.
    """
    return ModelSpec.from_dict(read_json(path))


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``path`` through a temporary file so a good model is never half-replaced."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "spec": checkpoint.spec.as_dict(),
        "kind": checkpoint.kind,
        "state_dict": checkpoint.state_dict,
        "info": checkpoint.info,
    }
    # Saved through a file object: torch names the archive inside after a path it is given,
    # and a temporary name would make identical models differ in bytes.
    with replacing(path) as temporary, open(temporary, "wb") as file:
        torch.save(payload, file)


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise MissingInputError(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a graft model file ({CHECKPOINT_FORMAT}).")
    return Checkpoint(
        ModelSpec.from_dict(payload["spec"]),
        payload["kind"],
        payload["state_dict"],
        payload["info"],
    )


def head_architecture_of(checkpoint: Checkpoint) -> dict[str, Any]:
    return dict(checkpoint.info.get("head", {"kind": "linear"}))


def build_head(checkpoint: Checkpoint, in_features: int) -> nn.Module:
    """The head of a ``head`` checkpoint alone, for scoring cached features, in eval mode."""
    if checkpoint.kind != "head":
        raise CheckpointError(f"build_head needs a head checkpoint, not {checkpoint.kind!r}.")
    head = make_head(in_features, len(checkpoint.spec.labels), head_architecture_of(checkpoint))
    head.load_state_dict(checkpoint.state_dict)
    return head.eval()


def attach_head(model: nn.Module, head: nn.Module) -> nn.Module:
    """Put ``head`` in place of the timm model's classifier (named by its pretrained config)."""
    *parents, name = model.pretrained_cfg.get("classifier", "classifier").split(".")
    owner = model
    for parent in parents:
        owner = getattr(owner, parent)
    setattr(owner, name, head)
    return model


def build_classifier(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild the full timm classifier a checkpoint describes, in eval mode.

    Raises:
        WeightsError: if a ``head`` checkpoint's backbone weights are not the recorded ones.
    """
    spec = checkpoint.spec
    num_classes = len(spec.labels)
    if checkpoint.kind == "head":
        backbone = create_backbone(spec.backbone, spec.weights, num_classes=num_classes)
        if spec.weights_sha256 and backbone.weights_sha256 != spec.weights_sha256:
            raise WeightsError(
                f"The head was trained on {spec.backbone} weights with sha256 "
                f"{spec.weights_sha256}, but {spec.weights!r} now gives {backbone.weights_sha256}: "
                "re-run the features and train_head stages."
            )
        model = backbone.model
        head = make_head(backbone.num_features, num_classes, head_architecture_of(checkpoint))
        head.load_state_dict(checkpoint.state_dict)
        attach_head(model, head)
    elif checkpoint.kind == "full":
        model = timm.create_model(spec.backbone, pretrained=False, num_classes=num_classes)
        architecture = head_architecture_of(checkpoint)
        if architecture["kind"] != "linear":
            attach_head(model, make_head(model.num_features, num_classes, architecture))
        model.load_state_dict(checkpoint.state_dict)
    else:
        raise CheckpointError(f"Unknown checkpoint kind {checkpoint.kind!r}.")
    return model.eval()
