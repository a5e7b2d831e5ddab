"""An exported model ready to classify images: onnxruntime session, labels and preprocessing.

Everything serving needs travels in the ONNX file's metadata (written by the export stage):
``labels`` and ``preprocessing`` (timm's data config: ``input_size``, ``interpolation``,
``crop_pct``, ``crop_mode``, ``mean``, ``std``). Preprocessing is re-implemented here with
Pillow and NumPy so that serving needs no torch; a test in the training environment checks it
against timm's own eval transform (:func:`graft.preprocessing.eval_transform`) on real images.
Images are decoded by :func:`graft.data.images.decode_image`, the loader training uses, so a
file serving accepts is a file training would have accepted, and the reverse.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnxruntime as ort
from PIL import Image

from graft.data.images import ImageRejected, check_resize_bound, decode_image
from graft.data_config import REQUIRED_KEYS, DataConfig
from graft.errors import GraftError, InputError
from graft.model_metadata import decode_metadata
from graft.numeric import softmax
from graft.runtime import inference_session
from graft.serving.limits import DEFAULT_MAX_PIXELS

# timm's names for Pillow's resampling filters (timm.data.transforms.str_to_interp_mode).
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash")


class ModelError(InputError):
    """A model file that cannot be served: missing, not ONNX, or not exported by graft."""


class NonFiniteOutputError(GraftError):
    """The model produced NaN or infinite logits: a broken model, never the request's fault."""


@dataclass(frozen=True)
class Preprocessing(DataConfig):
    """timm's evaluation transform in Pillow and NumPy: resize, centre crop, normalise.

    The config it applies is the :class:`graft.data_config.DataConfig` the model was trained
    with; serving supports the ``INTERPOLATIONS`` and ``CROP_MODES`` below.
    """

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "the model") -> Preprocessing:
        """Read timm's data config (as the export stage writes it into the metadata).

        Raises:
            ModelError: naming the missing or unusable key.
        """
        try:
            return cls._from_config(config, source)
        except (TypeError, ValueError, AttributeError) as exc:  # a value of the wrong kind
            raise ModelError(
                f"{source}: its preprocessing metadata is malformed ({type(exc).__name__}: "
                f"{exc}); re-export the model with `graft export`."
            ) from None

    @classmethod
    def _from_config(cls, config: dict[str, Any], source: str) -> Preprocessing:
        if not isinstance(config, dict):
            raise TypeError(f"it is a {type(config).__name__}, not a JSON object")
        missing = [key for key in REQUIRED_KEYS if key not in config]
        if missing:
            raise ModelError(
                f"{source}: its preprocessing metadata lacks {', '.join(missing)}; "
                "re-export the model with `graft export`."
            )
        read = DataConfig.from_dict(config)
        input_size, interpolation, crop_mode = read.input_size, read.interpolation, read.crop_mode
        crop_pct, mean, std = read.crop_pct, read.mean, read.std
        problems = []
        if len(input_size) != 3 or input_size[0] != 3 or min(input_size) < 1:
            problems.append(f"input_size {list(input_size)} is not [3, height, width]")
        if interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation '{interpolation}' is not one of {list(INTERPOLATIONS)}")
        if crop_mode not in CROP_MODES:
            problems.append(f"crop_mode '{crop_mode}' is not one of {list(CROP_MODES)}")
        if not 0 < crop_pct <= 1:
            problems.append(f"crop_pct {crop_pct} is outside (0, 1]")
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            problems.append(f"mean {list(mean)} / std {list(std)} are not 3 values (std > 0)")
        if problems:
            raise ModelError(f"{source}: cannot serve its preprocessing: {'; '.join(problems)}.")
        return cls(input_size, interpolation, crop_pct, crop_mode, mean, std)

    def as_config(self) -> dict[str, Any]:
        """The same keys as timm's data config, JSON-ready."""
        return self.as_dict()

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One RGB image as a normalised ``(3, height, width)`` float32 array.

        Raises:
            graft.data.images.ImageRejected: when the resize would be out of proportion
                (:func:`graft.data.images.check_resize_bound`) or memory runs out.
        """
        _, height, width = self.input_size
        # timm: scale_size = floor(size / crop_pct), then torchvision's Resize and CenterCrop.
        scale_h, scale_w = math.floor(height / self.crop_pct), math.floor(width / self.crop_pct)
        size = self._resized_size(image.size, scale_h, scale_w)
        check_resize_bound(*image.size, resized_pixels=size[0] * size[1])
        try:
            resized = image.resize(size, self._filter)
            pixels = _center_crop(np.asarray(resized, dtype=np.uint8), height, width)
            scaled = pixels.astype(np.float32) / np.float32(255)
            mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
            return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))
        except MemoryError:
            raise ImageRejected("too_many_pixels", "not enough memory to preprocess it") from None

    @property
    def _filter(self) -> Image.Resampling:
        return INTERPOLATIONS[self.interpolation]

    def _resized_size(self, size: tuple[int, int], scale_h: int, scale_w: int) -> tuple[int, int]:
        """The ``(width, height)`` torchvision's and timm's resize steps give ``size``."""
        width, height = size
        if self.crop_mode == "squash":
            return scale_w, scale_h
        if scale_h == scale_w:  # torchvision Resize(int): the shorter side, the other truncated
            if width <= height:
                return scale_w, int(scale_w * height / width)
            return int(scale_h * width / height), scale_h
        ratio = min(height / scale_h, width / scale_w)  # timm ResizeKeepRatio(longest=0)
        return round(width / ratio), round(height / ratio)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's CenterCrop on an ``(H, W, C)`` array: the middle, rounding as it does."""
    image_h, image_w = pixels.shape[:2]
    top, left = int(round((image_h - height) / 2.0)), int(round((image_w - width) / 2.0))
    return pixels[top : top + height, left : left + width]


@dataclass(frozen=True)
class FileIdentity:
    """What ``stat`` says about a file; it changes when the file is replaced or rewritten."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> FileIdentity:
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Prediction:
    """The top-k labels of one image, most probable first."""

    top_k: tuple[tuple[str, float], ...]

    @property
    def label(self) -> str:
        return self.top_k[0][0]

    @property
    def probability(self) -> float:
        return self.top_k[0][1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "probability": self.probability,
            "top_k": [{"label": label, "probability": p} for label, p in self.top_k],
        }


@dataclass(frozen=True)
class ServedModel:
    """One loaded model file. Immutable: a reload builds a new one and swaps the reference.

    Attributes:
        path: the file as given.
        sha256: of the bytes the session was built from.
        identity: the file's ``stat`` at the moment those bytes were read.
        labels: class names, in the order of the model's outputs.
        metadata: the ONNX metadata, JSON values decoded.
    """

    path: Path
    sha256: str
    identity: FileIdentity
    session: ort.InferenceSession = field(repr=False)
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    metadata: dict[str, Any] = field(repr=False)

    @property
    def version(self) -> str:
        """A short content address: the first 12 hex digits of the file's sha256."""
        return self.sha256[:12]

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.preprocessing(image)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw outputs for an ``(N, 3, H, W)`` float32 batch.

        Raises:
            NonFiniteOutputError: if any logit is NaN or infinite.
        """
        (out,) = self.session.run(None, {self.input_name: batch})
        if not np.isfinite(out).all():
            raise NonFiniteOutputError(
                f"the model {self.path} (sha256 {self.version}) produced non-finite logits; "
                "it is broken: re-export it or roll back to the previous model."
            )
        return out

    def classify(self, batch: np.ndarray, top_k: int) -> list[Prediction]:
        """Top-``top_k`` labels with softmax probabilities for each image of ``batch``."""
        probabilities = softmax(self.logits(batch))
        k = max(1, min(top_k, len(self.labels)))
        # A stable sort keeps ties in label order, so the answer never depends on chance.
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [
            Prediction(tuple((self.labels[i], float(row[i])) for i in indices))
            for row, indices in zip(probabilities, order, strict=True)
        ]


def load_model(path: str | Path, *, threads: int | None = None) -> ServedModel:
    """Load ``path`` with its labels and preprocessing, read from the file's own metadata.

    The bytes are read once through one open file, so the sha256, the ``stat`` identity and the
    session all describe the same file even if it is being replaced at that moment.

    Args:
        path: an ONNX model written by ``graft export``.
        threads: onnxruntime's intra-op threads (its default, one per core, when None).

    Raises:
        ModelError: if the file is missing, not ONNX, or lacks graft's metadata.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            identity = FileIdentity.of(os.fstat(handle.fileno()))
            data = handle.read()
    except FileNotFoundError:
        raise ModelError(
            f"{path} not found: give the path of an exported model "
            "(models/model.onnx after `make run`)."
        ) from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a folder: give the path of the .onnx file.") from None
    except OSError as exc:  # e.g. a file the server's user may not read
        raise ModelError(
            f"{path} cannot be read ({exc.strerror}): make it readable by this user."
        ) from None
    try:
        session = inference_session(data, threads=threads, quiet=True)
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
        raise ModelError(f"{path} is not a usable ONNX model: {exc}".strip()) from None
    metadata = decode_metadata(session.get_modelmeta().custom_metadata_map)
    labels = metadata.get("labels")
    if not isinstance(labels, list) or not labels or "preprocessing" not in metadata:
        raise ModelError(
            f"{path} has no labels or preprocessing in its metadata: it was not exported by "
            "graft. Export it with `graft export` (or `make run`)."
        )
    preprocessing = Preprocessing.from_config(metadata["preprocessing"], str(path))
    _check_signature(session, preprocessing, len(labels), path)
    return ServedModel(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        identity=identity,
        session=session,
        labels=tuple(str(label) for label in labels),
        preprocessing=preprocessing,
        metadata=metadata,
    )


def decode(
    source: str | Path | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an image file (a path or an open file) or its bytes exactly as training does.

    Raises:
        graft.data.images.ImageRejected: with the same reasons training quarantines files for.
    """
    return decode_image(source, max_pixels=max_pixels).image


def _check_signature(
    session: ort.InferenceSession, preprocessing: Preprocessing, classes: int, path: Path
) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"{path} has {len(inputs)} inputs and {len(outputs)} outputs, not 1 and 1."
        )
    expected = list(preprocessing.input_size)
    static = [dim if isinstance(dim, int) else None for dim in inputs[0].shape[1:]]
    if len(static) != 3 or any(
        d is not None and d != e for d, e in zip(static, expected, strict=False)
    ):
        raise ModelError(
            f"{path}: its input {inputs[0].shape} does not take the {expected} images its "
            "preprocessing metadata describes."
        )
    width = outputs[0].shape[-1] if outputs[0].shape else None
    if isinstance(width, int) and width != classes:
        raise ModelError(f"{path}: it outputs {width} scores but lists {classes} labels.")
