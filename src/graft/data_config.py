"""The preprocessing config, typed: timm's data config as it travels with every artifact.

It is read from the backbone (timm's ``resolve_model_data_config``, never hand-written), kept in
the features' spec and every checkpoint, written into the ONNX metadata by the export stage and
read back from it by the server. :meth:`DataConfig.as_dict` is its one JSON form (lists) and
:meth:`DataConfig.timm_kwargs` what timm's transform factory takes (tuples). Pure Python: the
server (no torch) builds its preprocessing on it (:class:`graft.serving.model.Preprocessing`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graft.errors import InputError

# What timm's eval transform assumes when a config leaves them out.
DEFAULT_CROP_PCT, DEFAULT_CROP_MODE = 0.875, "center"
REQUIRED_KEYS = ("input_size", "interpolation", "mean", "std")


class DataConfigError(InputError):
    """A preprocessing config that lacks a key timm's transforms need."""


@dataclass(frozen=True)
class DataConfig:
    """timm's data config.

    Attributes:
        input_size: ``(channels, height, width)`` of one model input.
        interpolation: timm's name of the resize filter (``bicubic``, ``bilinear``...).
        crop_pct: the crop's share of the resized image (the resize target is size / crop_pct).
        crop_mode: ``center`` (keep the aspect ratio, crop the middle), ``squash``...
        mean, std: per-channel normalisation of pixel values scaled to [0, 1].
    """

    input_size: tuple[int, ...]
    interpolation: str
    crop_pct: float
    crop_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DataConfig:
        """Read timm's config, or its JSON form (lists), e.g. from a spec or the ONNX metadata.

        Raises:
            DataConfigError: naming the keys it lacks among input_size, interpolation, mean, std.
        """
        missing = [key for key in REQUIRED_KEYS if key not in config]
        if missing:
            raise DataConfigError(
                f"the preprocessing config {dict(config)} lacks {', '.join(missing)}: it must be "
                "timm's data config of the backbone (timm.data.resolve_model_data_config)."
            )
        return cls(
            input_size=tuple(int(v) for v in config["input_size"]),
            interpolation=str(config["interpolation"]),
            crop_pct=float(config.get("crop_pct") or DEFAULT_CROP_PCT),
            crop_mode=str(config.get("crop_mode") or DEFAULT_CROP_MODE),
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON form, in timm's key order (lists, not tuples)."""
        return {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    def timm_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``timm.data.create_transform`` (and a ``pretrained_cfg``)."""
        return {
            "input_size": self.input_size,
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }
