"""LP-FT: fine-tune the top of the backbone together with the head trained on its features.

The model starts as backbone + trained head (epoch 0 is that model, the LP baseline). Phases
from ``params.yaml`` train a growing number of the backbone's top blocks, each phase with its own
AdamW optimizer whose learning rate decays layer by layer below the head (timm's
``create_optimizer_v2(layer_decay=...)``, applied as ``lr_scale`` by timm's cosine scheduler).

Everything below the deepest phase's cut stays frozen in eval mode, so its output for an image is
a pure function of the image: without augmentation it is computed once ("the frozen prefix");
with augmentation it is recomputed each epoch on the augmented images, through the fast frozen
engine (onnxruntime on CPU), and only the top runs in torch with gradients.

How to fine-tune is chosen per data set: ``finetune.recipes`` names a small portfolio (how many
top blocks are trained, whether their BatchNorm adapts, whether the training images are randomly
transformed by the declared ``data.invariances``). Each recipe runs the first
``finetune.trial_epochs`` epochs of its own schedule; the first recipe is continued unless
another is ahead on val beyond noise (a paired bootstrap over the val images), and the one
continued picks up where its trial stopped, so no epoch is run twice. All of it shares
``finetune.max_minutes``.

Each epoch ends with a checkpoint (phase, trainable set, optimizer groups, scheduler, random
state, a fingerprint of the configuration and recipe), one per recipe, so a killed run resumes
where it stopped and reaches what an uninterrupted run reaches; a checkpoint of another
configuration is never loaded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from graft.activation_shards import (
    InMemoryActivations,
    ScratchSpace,
    ShardedActivations,
    store_activations,
)
from graft.config import RECIPE_NAME, AugmentParams, FinetuneParams
from graft.data_config import DataConfig
from graft.engines import Engine, make_runner, resolve_engine
from graft.errors import GraftError
from graft.features import iter_batch_outputs
from graft.files import replacing
from graft.head import accuracy
from graft.progress import progress

CHECKPOINT_FORMAT = "graft.finetune.resume/2"
EpochHook = Callable[[dict[str, Any], nn.Module], None]
Activations = InMemoryActivations | ShardedActivations
_clock = time.monotonic  # the clock of the time budget


# Val images the top scores at once. Its intermediate tensors scale with it (the first of
# tf_efficientnet_lite0's top 2 blocks expands to 672 channels at 14 x 14: 135 MB for 256
# images): at 256 they lifted the stage's peak by 0.4 GB at every epoch's end on the sample.
SCORING_ROWS = 64


class FinetuneError(GraftError):
    """Fine-tuning cannot run as configured, or its training diverged."""


@dataclass(frozen=True)
class TrunkSplit:
    """A classifier cut in two: a frozen prefix and a trainable top that ends in the logits."""

    prefix: nn.Module
    top: Callable[[torch.Tensor], torch.Tensor]
    backbone_top: list[nn.Module]
    head: nn.Module


@dataclass(frozen=True)
class Recipe:
    """One way to fine-tune: the unfreeze schedule, the BatchNorm policy, and whether the training
    images are randomly transformed by the declared invariances."""

    name: str
    phases: tuple[tuple[int, int], ...]
    bn: str
    invariant: bool = False

    @property
    def cut(self) -> int:
        """The deepest phase's blocks: everything below stays frozen."""
        return max(blocks for blocks, _ in self.phases)


def recipes_of(params: FinetuneParams, invariances: Sequence[str] = ()) -> list[Recipe]:
    """The recipes to try, in order of preference (the first is the default).

    ``finetune.recipes`` each train their top N blocks for all of the section's epochs, and
    each also runs as ``NAME+inv`` (right after it) when invariances are declared. Without
    recipes, the section's own schedule with its ``bn`` (both policies for ``auto``), trained on
    the invariances when declared.
    """
    invariant = bool(invariances)
    if not params.recipes:
        policies = ["frozen", "adapt"] if params.bn == "auto" else [params.bn]
        suffix = "+inv" if invariant else ""
        phases = tuple(params.phases)
        return [Recipe(policy + suffix, phases, policy, invariant) for policy in policies]
    epochs = sum(count for _, count in params.phases)
    recipes = []
    for name in params.recipes:
        blocks, bn = RECIPE_NAME.fullmatch(name).groups()
        recipes.append(Recipe(name, ((int(blocks), epochs),), bn))
        if invariant:
            recipes.append(Recipe(name + "+inv", ((int(blocks), epochs),), bn, True))
    return recipes


def choose_recipe(
    trials: dict[str, dict[str, Any]], resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The recipe to continue: the first (the default) unless another's trial is ahead on val
    beyond noise, then the best of those (ties: the earlier).

    "Beyond noise": the paired bootstrap 95% interval over the val images of its accuracy minus
    the default's lies above 0. With a hundred-odd val images one image is most of a point, and a
    short trial's ranking is itself noisy: the default gives way only to a clear lead.

    Args:
        trials: per recipe in order of preference, ``val_correct`` (whether its trial's best
            model got each val image right, same images in the same order).
    """
    names = list(trials)
    default = names[0]
    correct = {name: np.asarray(trials[name]["val_correct"], dtype=float) for name in names}
    accuracy = {name: float(correct[name].mean()) if correct[name].size else 0.0 for name in names}
    n = correct[default].size
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n)) if n else None
    intervals, ahead = {}, []
    for name in names[1:]:
        if draws is None:
            intervals[name] = [0.0, 0.0]
            continue
        gain = (correct[name] - correct[default])[draws].mean(axis=1)
        low, high = np.percentile(gain, [2.5, 97.5])
        intervals[name] = [float(low), float(high)]
        if low > 0.0:
            ahead.append(name)
    chosen = max(ahead, key=lambda name: (accuracy[name], -names.index(name))) if ahead else default
    return {
        "recipe": chosen,
        "default": default,
        "val_accuracy": accuracy,
        "val_images": int(n),
        "gain_over_default_ci95": intervals,
    }


@dataclass
class FinetuneResult:
    """The best model on val (the head itself when fine-tuning never beat it) and the run."""

    state_dict: dict[str, torch.Tensor]
    head_val_accuracy: float
    val_accuracy: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    bn: str = "frozen"
    stopped: str = "completed"
    candidates: dict[str, float] = field(default_factory=dict)  # recipe: its trial's val score
    recipe: str = ""
    trials: dict[str, dict[str, Any]] = field(default_factory=dict)  # recipe: its trial
    choice: dict[str, Any] | None = None  # why the recipe continued was chosen
    seconds: float = 0.0  # training time, every recipe's included
    resumed_at_epoch: int | None = None
    val_logits: torch.Tensor | None = None  # the best model's, in the order of the val images
    head_val_logits: torch.Tensor | None = None  # the head's (epoch 0), in the same order
    prefix: dict[str, Any] = field(default_factory=dict)  # where the activations were held

    @property
    def beats_head(self) -> bool:
        return self.best_epoch > 0


def _blocks_of(model: nn.Module) -> nn.Sequential:
    needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
    if not all(hasattr(model, name) for name in needed):
        raise FinetuneError(
            f"Fine-tuning supports timm EfficientNet-family backbones (conv_stem, blocks, "
            f"conv_head); {type(model).__name__} is not one. Set finetune.enabled: false."
        )
    return model.blocks


def check_schedule(model: nn.Module, params: FinetuneParams) -> None:
    """Refuse a schedule the backbone cannot follow, before any work.

    Raises:
        FinetuneError: naming ``finetune.unfreeze_blocks`` if a phase asks for too many blocks.
    """
    available = len(_blocks_of(model))
    for blocks, _ in params.phases:
        if blocks > available:
            raise FinetuneError(
                f"finetune.unfreeze_blocks is {blocks}, but the backbone has only {available} "
                f"blocks: choose 1 to {available} in params.yaml."
            )
    for recipe in recipes_of(params):
        if params.recipes and recipe.cut > available:
            raise FinetuneError(
                f"finetune.recipes has {recipe.name}, but the backbone has only {available} "
                f"blocks: choose top1 to top{available} in params.yaml."
            )


def split_trunk(model: nn.Module, unfreeze_blocks: int) -> TrunkSplit:
    """Cut a timm EfficientNet-style model below its top ``unfreeze_blocks`` entries of ``blocks``.

    Raises:
        FinetuneError: if the model has no such structure or fewer blocks than asked.
    """
    blocks = _blocks_of(model)
    if unfreeze_blocks > len(blocks):
        raise FinetuneError(
            f"finetune.unfreeze_blocks is {unfreeze_blocks}, but the backbone has only "
            f"{len(blocks)} blocks: choose 1 to {len(blocks)}."
        )
    lower, upper = blocks[: len(blocks) - unfreeze_blocks], blocks[len(blocks) - unfreeze_blocks :]
    prefix = nn.Sequential(model.conv_stem, model.bn1, lower)

    def top(h: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.bn2(model.conv_head(upper(h))))

    return TrunkSplit(prefix, top, [upper, model.conv_head, model.bn2], model.get_classifier())


def augment_transform(
    data_config: DataConfig, augment: AugmentParams
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training transform for the backbone's data config with the ``augment`` settings."""
    config = data_config.timm_kwargs()
    config.pop("crop_pct", None)  # training crops are random-resized, not centred
    config.pop("crop_mode", None)
    return timm.data.create_transform(
        **config,
        is_training=True,
        scale=tuple(augment.scale),
        ratio=tuple(augment.ratio),
        hflip=augment.hflip,
        vflip=augment.vflip,
        color_jitter=augment.color_jitter or None,
        auto_augment=augment.auto_augment,
        re_prob=augment.re_prob,
    )


class RandomInvariance:
    """A random member of the group the declared invariances generate, applied to a PIL image.

    ``hflip`` and ``vflip`` flip with probability 1/2 each; ``rot90`` turns by 0, 90, 180 or
    270 degrees. All exact pixel permutations (no interpolation); drawn from Python's
    ``random``, which fine-tuning seeds per epoch.
    """

    _ROTATIONS = (
        None,
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_180,
        Image.Transpose.ROTATE_270,
    )

    def __init__(self, invariances: Sequence[str]) -> None:
        self.invariances = tuple(invariances)

    def __call__(self, image: Image.Image) -> Image.Image:
        if "hflip" in self.invariances and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if "vflip" in self.invariances and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if "rot90" in self.invariances:
            turn = random.choice(self._ROTATIONS)
            if turn is not None:
                image = image.transpose(turn)
        return image


def invariant_transform(
    invariances: Sequence[str], transform: Callable[[Image.Image], torch.Tensor]
) -> Callable[[Image.Image], torch.Tensor]:
    """``transform`` after a random transformation the data is declared invariant to."""
    draw = RandomInvariance(invariances)
    return lambda image: transform(draw(image))


def fingerprint(**parts: Any) -> str:
    """A stable hash of everything a run's result depends on (JSON-able values)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def trainable_names(model: nn.Module, blocks: int) -> list[str]:
    """The parameters trained in a phase that trains the top ``blocks`` blocks (and the head)."""
    first = len(_blocks_of(model)) - blocks
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    names = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= first:
            names.append(name)
        elif parts[0] in ("conv_head", "bn2") or name.startswith(classifier + "."):
            names.append(name)
    return names


class _Top(nn.Module):
    """The part above the cached cut: frozen middle blocks (no grad), then the trained top."""

    def __init__(self, model: nn.Module, cut: int, blocks: int) -> None:
        super().__init__()
        n = len(model.blocks)
        self.model = model
        self.middle = model.blocks[n - cut : n - blocks]
        self.upper = model.blocks[n - blocks :]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if len(self.middle):
            with torch.no_grad():
                h = self.middle(h)
        model = self.model
        return model.forward_head(model.bn2(model.conv_head(self.upper(h))))

    def adapting_norms(self) -> list[nn.Module]:
        modules = [self.upper, self.model.bn2]
        return [m for module in modules for m in module.modules() if _is_batchnorm(m)]


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _seed_epoch(seed: int, epoch: int) -> None:
    """Every random stream an epoch draws from, as a function of (seed, epoch)."""
    value = (seed * 1_000_003 + epoch) % (2**31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def _random_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_random_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Data:
    """Activations at the cut (computed once, or per epoch when augmenting) and labels."""

    val: Activations
    val_labels: torch.Tensor
    train_labels: torch.Tensor
    train: Activations | None  # None: recomputed each epoch from augmented images
    augmented: Callable[[int], Activations]


def finetune(
    model: nn.Module,
    train_paths: Sequence[Path],
    train_labels: np.ndarray,
    val_paths: Sequence[Path],
    val_labels: np.ndarray,
    transform: Callable[[Image.Image], torch.Tensor],
    input_size: list[int],
    params: FinetuneParams,
    engine: Engine = "auto",
    *,
    train_transform: Callable[[Image.Image], torch.Tensor] | None = None,
    invariances: Sequence[str] = (),
    checkpoint_dir: Path | None = None,
    config_id: str = "",
    on_epoch: EpochHook | None = None,
    scratch_dir: Path | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` (backbone + trained head) and return its best state on val.

    With more than one recipe (:func:`recipes_of`), each runs a trial of
    ``params.trial_epochs`` epochs, and the one :func:`choose_recipe` picks continues.

    Args:
        transform: the evaluation transform (val always; train when not augmenting).
        train_transform: the augmenting transform, or None for no augmentation.
        invariances: the declared ``data.invariances``: recipes ``NAME+inv`` train on images
            randomly transformed by them (after ``train_transform``, if any).
        checkpoint_dir: where the per-epoch resume checkpoints live; None keeps none.
        config_id: a fingerprint of the inputs outside ``params`` (data, head, backbone); a
            checkpoint is resumed only when it, ``params`` and the recipe are those of this run.
        on_epoch: called after each epoch's checkpoint with the epoch's record (its
            ``recipe`` included) and the model.
        scratch_dir: where a split's activations larger than ``params.prefix_memory_mb`` are
            written while the run lasts (None: the system's temporary folder); removed after.

    Raises:
        FinetuneError: for a schedule the backbone cannot follow, or a NaN/infinite loss (the
            last good checkpoint is kept).
    """
    check_schedule(model, params)
    root = scratch_dir if scratch_dir is not None else Path(tempfile.gettempdir()) / "graft"
    with ScratchSpace(root) as scratch:
        return _finetune(
            model,
            (train_paths, train_labels, val_paths, val_labels),
            transform,
            input_size,
            params,
            engine,
            train_transform=train_transform,
            invariances=invariances,
            checkpoint_dir=checkpoint_dir,
            config_id=config_id,
            on_epoch=on_epoch,
            scratch=scratch,
        )


def _finetune(
    model: nn.Module,
    splits: tuple[Sequence[Path], np.ndarray, Sequence[Path], np.ndarray],
    transform: Callable[[Image.Image], torch.Tensor],
    input_size: list[int],
    params: FinetuneParams,
    engine: Engine,
    *,
    train_transform: Callable[[Image.Image], torch.Tensor] | None,
    invariances: Sequence[str],
    checkpoint_dir: Path | None,
    config_id: str,
    on_epoch: EpochHook | None,
    scratch: ScratchSpace,
) -> FinetuneResult:
    """:func:`finetune` with the scratch space its streamed activations are written to."""
    train_paths, train_labels, val_paths, val_labels = splits
    recipes = recipes_of(params, invariances)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    model.eval().to(device)
    memory_format = torch.channels_last if on_cuda and params.amp else torch.contiguous_format
    runners: dict[int, Any] = {}
    budget_bytes = int(params.prefix_memory_mb * 2**20)
    prefix_report: dict[str, Any] = {"memory_budget_mb": params.prefix_memory_mb, "splits": {}}

    def activations(
        cut: int, paths: Sequence[Path], image_transform, name: str, split: str
    ) -> Activations:
        """The frozen prefix below the top ``cut`` blocks, run over the images: in memory, or
        streamed from disk shards when the split is larger than ``prefix_memory_mb``."""
        if cut not in runners:
            prefix = split_trunk(model, cut).prefix
            runners[cut] = make_runner(prefix, input_size, params.batch_size, engine)
        with progress(len(paths), name) as bar:

            def outputs():
                for output in iter_batch_outputs(
                    runners[cut], paths, image_transform, params.batch_size
                ):
                    bar.update(len(output))
                    yield output

            stored = store_activations(
                outputs(), len(paths), budget_bytes, params.batch_size, scratch, device,
                memory_format,
            )  # fmt: skip
        if stored.streamed and split not in prefix_report["splits"]:
            print(
                f"finetune: {name}: {len(stored)} images, {stored.nbytes / 2**20:.0f} MB > "
                f"finetune.prefix_memory_mb ({params.prefix_memory_mb:g}): streamed from "
                f"{stored.shards} shards ({stored.bytes_on_disk / 2**20:.0f} MB) in "
                f"{scratch.folder}"
            )
        prefix_report["splits"][split] = {
            "images": len(stored),
            "mb": round(stored.nbytes / 2**20, 1),
            "streamed": stored.streamed,
            "shards": stored.shards,
        }
        return stored

    model.to(device=device, memory_format=memory_format)
    val_labels_t = torch.tensor(np.asarray(val_labels), dtype=torch.long, device=device)
    train_labels_t = torch.tensor(np.asarray(train_labels), dtype=torch.long, device=device)
    val_at: dict[int, Activations] = {}
    train_at: dict[int, Activations] = {}

    def data_for(recipe: Recipe) -> _Data:
        cut = recipe.cut
        if cut not in val_at:
            name = f"frozen prefix (val, top {cut})"
            val_at[cut] = activations(cut, val_paths, transform, name, f"val, top {cut}")
        randomised = train_transform
        if recipe.invariant:
            randomised = invariant_transform(invariances, train_transform or transform)
        if randomised is None and cut not in train_at:
            name = f"frozen prefix (top {cut})"
            train_at[cut] = activations(cut, train_paths, transform, name, f"train, top {cut}")
        if randomised is None:  # not run again while training: its session and arena go
            runners.pop(cut, None)

        def augmented(epoch: int) -> Activations:
            _seed_epoch(params.seed, epoch)  # the decoder thread is the only consumer here
            name = f"frozen prefix (train, epoch {epoch}, {recipe.name})"
            return activations(cut, train_paths, randomised, name, f"train, {recipe.name}")

        return _Data(
            val=val_at[cut],
            val_labels=val_labels_t,
            train_labels=train_labels_t,
            train=None if randomised is not None else train_at[cut],
            augmented=augmented,
        )

    initial = copy.deepcopy(model.state_dict())

    def val_logits(data: _Data, cut: int) -> torch.Tensor:
        model.eval()
        with torch.inference_mode():
            top = _Top(model, cut, cut)
            return torch.cat([top(chunk.float()) for chunk in data.val.chunks(SCORING_ROWS)]).cpu()

    # The head alone (epoch 0), e.g. to average with the best.
    head_val_logits = val_logits(data_for(recipes[0]), recipes[0].cut)
    budget_s = params.max_minutes * 60.0  # shared by every recipe's trial and the continuation
    trial_epochs = params.trial_epochs if len(recipes) > 1 else None
    runs: dict[str, _PolicyRun] = {}
    result, run = None, None
    for recipe in recipes:
        model.load_state_dict(initial)
        run = _PolicyRun(model, data_for(recipe), params, recipe, on_cuda)
        path = None
        if checkpoint_dir is not None:
            path = checkpoint_dir / f"finetune-{recipe.name}.resume.pt"
        identity = fingerprint(
            format=CHECKPOINT_FORMAT,
            params=params.model_dump(mode="json"),
            recipe=asdict(recipe),
            invariances=list(invariances),
            engine=resolve_engine(engine),
            config=config_id,
        )
        run.locate(path, identity)
        runs[recipe.name] = run
        # Each trial may use its share of the budget at most.
        result = run.train(on_epoch, budget_s / len(recipes), until_epoch=trial_epochs)
    trials: dict[str, dict[str, Any]] = {}
    choice = None
    if len(recipes) > 1:
        trials = {name: run.trial for name, run in runs.items()}
        choice = choose_recipe(trials)
        run = runs[choice["recipe"]]
        spent = sum(trial["seconds"] for name, trial in trials.items() if name != run.name)
        scores = ", ".join(
            f"{name} {trial['val_accuracy']:.4f} in {trial['seconds']:.0f} s"
            for name, trial in trials.items()
        )
        print(f"finetune: trials on val: {scores}; continuing {run.name}")
        result = run.train(on_epoch, budget_s - spent, resume=run.paused)
    assert result is not None and run is not None
    result.seconds += sum(t["seconds"] for name, t in trials.items() if name != run.name)
    result.candidates = {name: trial["val_accuracy"] for name, trial in trials.items()}
    result.trials = {
        name: {key: value for key, value in trial.items() if key != "val_correct"}
        for name, trial in trials.items()
    }
    result.choice = choice
    model.load_state_dict(result.state_dict)
    # What the best model says on val, e.g. to calibrate it.
    result.val_logits = val_logits(run.data, run.recipe.cut)
    result.head_val_logits = head_val_logits
    result.prefix = {
        **prefix_report,
        "streamed": any(split["streamed"] for split in prefix_report["splits"].values()),
        "disk_mb_peak": round(scratch.peak_bytes / 2**20, 1),
    }
    return result


class _PolicyRun:
    """One pass through a recipe's schedule, possibly paused after its trial and continued."""

    def __init__(self, model, data: _Data, params: FinetuneParams, recipe: Recipe, on_cuda):
        self.model, self.data, self.params, self.recipe = model, data, params, recipe
        self.name, self.policy, self.cut = recipe.name, recipe.bn, recipe.cut
        self.on_cuda, self.budget_s = on_cuda, math.inf
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
        self.path: Path | None = None
        self.identity = ""
        self.trial: dict[str, Any] = {}  # the trial's outcome, once it has run
        self.paused: dict[str, Any] | None = None  # the checkpoint the trial ended on
        self.last: dict[str, Any] | None = None  # the latest epoch's checkpoint
        self.resumed_at: int | None = None  # the epoch a checkpoint on disk resumed after
        self.ema: ModelEmaV3 | None = None  # the weight average scored and kept, when on

    def start_ema(self, checkpoint: dict[str, Any] | None, steps: int) -> None:
        """The exponential moving average of the weights (``finetune.ema_epochs``), updated
        after every step from the head's weights on, or as the checkpoint left it."""
        epochs = self.params.ema_epochs
        if epochs <= 0:
            self.ema = None
            return
        # A time constant of ema_epochs epochs, whatever the number of steps per epoch.
        self.ema = ModelEmaV3(self.model, decay=math.exp(-1.0 / (epochs * steps)))
        if checkpoint is not None and checkpoint.get("ema") is not None:
            self.ema.module.load_state_dict(checkpoint["ema"])

    @property
    def scored(self) -> nn.Module:
        """The model scored on val and kept: the weight average when on, else the live one."""
        return self.ema.module if self.ema is not None else self.model

    def locate(self, path: Path | None, identity: str) -> None:
        """Where this run's resume checkpoint lives, and the identity it must carry."""
        self.path, self.identity = path, identity

    def _autocast(self):
        if self.on_cuda and self.params.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def evaluate(self, top: _Top) -> tuple[float, float, list[bool]]:
        """(val loss, val accuracy, whether each val image is right) of ``top``'s model in eval
        mode (the live model, or its weight average)."""
        top.model.eval()
        with torch.inference_mode():  # fp32 even under AMP: epoch 0 must score what the head did
            logits = torch.cat([top(chunk.float()) for chunk in self.data.val.chunks(SCORING_ROWS)])
        labels = self.data.val_labels
        correct = (logits.argmax(dim=1) == labels).cpu().tolist()
        loss = float(nn.functional.cross_entropy(logits, labels)) if len(labels) else math.nan
        return loss, accuracy(logits, labels), correct

    def set_phase(self, blocks: int) -> tuple[_Top, list[str]]:
        top = _Top(self.model, self.cut, blocks)
        names = set(trainable_names(self.model, blocks))
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in names)
        return top, sorted(names)

    def set_train_mode(self, top: _Top) -> None:
        self.model.eval()  # frozen statistics everywhere ...
        if self.policy == "adapt":  # ... except in the trained blocks, which adapt to the data
            for norm in top.adapting_norms():
                norm.train()

    def recalibrate(self, top: _Top, train_h: Activations) -> None:
        """Adapting statistics: recompute them over train with the epoch's final weights.

        timm's TF-ported EfficientNets keep running statistics with momentum 0.01, far behind
        the changing weights after a few hundred steps; evaluating on those would mismatch.
        """
        norms = top.adapting_norms()
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the pass
            norm.train()
        with torch.no_grad(), self._autocast():
            for chunk in train_h.chunks(self.params.batch_size):
                top(chunk)
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        top.model.eval()

    def train(
        self,
        on_epoch: EpochHook | None,
        budget_s: float,
        *,
        until_epoch: int | None = None,
        resume: dict[str, Any] | None = None,
    ) -> FinetuneResult:
        """Run the schedule phase by phase from the head, from the resume checkpoint on disk, or
        from ``resume`` (where the trial paused); pause after ``until_epoch`` epochs (a trial).

        ``state`` is the run's progress, saved with every epoch's resume checkpoint: the phase
        and epoch, the best score and weights so far, the phase's early-stopping count, the
        history, why the run stopped, and the trial's outcome once it has run.

        Args:
            budget_s: seconds this run may have spent in all, its trial included.
        """
        self.budget_s = budget_s
        checkpoint = resume if resume is not None else _load_resumable(self.path, self.identity)
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            state = copy.deepcopy(checkpoint["state"])
            self.last = checkpoint if "optimizer" in checkpoint else None
            if resume is None:
                self.resumed_at = state["epoch"]  # kept when the trial's run goes on
                epoch = self.resumed_at
                print(f"finetune: {self.name}: resuming after epoch {epoch} from {self.path}")
        else:
            head = self.evaluate(_Top(self.model, self.cut, self.cut))
            state = _initial_state(self.model, *head)
        started = _clock() - state["elapsed_s"]
        steps = math.ceil(len(self.data.train_labels) / self.params.batch_size)
        self.start_ema(checkpoint, steps)
        phases = self.recipe.phases
        paused = until_epoch is not None and state["trial"] is not None  # ran before a restart
        while state["phase"] < len(phases) and state["stopped"] == "completed" and not paused:
            blocks, epochs = phases[state["phase"]]
            if epochs == 0:  # a phase switched off
                state["phase"] += 1
                continue
            top, names = self.set_phase(blocks)
            optimizer, scheduler = self.phase_optimizer(epochs, steps)
            if checkpoint is not None:
                _resume_phase(checkpoint, state, names, optimizer, scheduler, self.path)
                checkpoint = None
            run = (top, blocks, epochs, names, optimizer, scheduler)
            paused = self.run_phase(*run, state, started, steps, on_epoch, until_epoch)
        if until_epoch is not None:
            if state["trial"] is None:  # the trial has just ended: keep where it stopped
                # Scored by its best trained epoch: the head (epoch 0) is every recipe's start.
                trained = state["trained_best"] or {"score": state["best_score"], "epoch": 0}
                state["trial"] = {
                    "val_accuracy": trained["score"][0],
                    "val_correct": trained.get("correct", state["best_correct"]),
                    "best_epoch": trained["epoch"],
                    "epochs": state["epoch"],
                    "seconds": state["elapsed_s"],
                    "stopped": state["stopped"],
                }
                if self.last is not None:
                    self.last["state"]["trial"] = copy.deepcopy(state["trial"])
                    if self.path is not None:
                        _write_resumable(self.path, self.last)
            self.trial = state["trial"]
            # Where the continuation starts; a run that is over needs no optimizer to go on.
            self.paused = self.last or {
                "model": _cpu(self.model.state_dict()),
                "ema": _cpu(self.scored.state_dict()) if self.ema is not None else None,
                "state": state,
            }
        head_acc = state["history"][0]["val_accuracy"]
        return FinetuneResult(
            state_dict={k: v.detach().cpu() for k, v in state["best_state"].items()},
            head_val_accuracy=head_acc,
            val_accuracy=state["best_score"][0],
            best_epoch=state["best_epoch"],
            history=state["history"],
            bn=self.policy,
            stopped=state["stopped"],
            resumed_at_epoch=self.resumed_at,
            recipe=self.name,
            seconds=state["elapsed_s"],
        )

    def phase_optimizer(self, epochs: int, steps: int):
        """AdamW with timm's layer-wise decay, and its cosine schedule over the phase's steps."""
        params = self.params
        optimizer = create_optimizer_v2(
            self.model,
            "adamw",
            lr=params.lr,
            weight_decay=params.weight_decay,
            layer_decay=params.layer_decay,
        )
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=max(epochs * steps, 1),
            warmup_t=round(params.warmup_epochs * steps),
            warmup_lr_init=params.lr * 0.01,
            t_in_epochs=False,
        )
        scheduler.step_update(0)
        return optimizer, scheduler

    def run_phase(
        self, top, blocks, epochs, names, optimizer, scheduler, state, started, steps, on_epoch,
        until_epoch,
    ) -> bool:  # fmt: skip
        """The epochs of one phase, until it ends, stops early, or the time budget runs out;
        True if it paused after ``until_epoch`` epochs of the run (the end of a trial)."""
        params, data = self.params, self.data
        while state["epoch_in_phase"] < epochs:
            if until_epoch is not None and state["epoch"] >= until_epoch:
                return True
            elapsed = _clock() - started
            epochs_done = state["epoch"]
            per_epoch = elapsed / epochs_done if epochs_done else 0.0
            if elapsed + per_epoch > self.budget_s:
                state["stopped"] = f"time budget (finetune.max_minutes: {params.max_minutes})"
                return False
            epoch = state["epoch"] + 1
            train_h = data.train if data.train is not None else data.augmented(epoch)
            _seed_epoch(params.seed, 1_000 + epoch)
            train_loss = self.train_epoch(top, optimizer, scheduler, train_h, epoch, state, steps)
            scored = top if self.ema is None else _Top(self.ema.module, self.cut, blocks)
            if self.policy == "adapt":
                self.recalibrate(scored, train_h)
            if train_h is not data.train:
                train_h.close()  # this epoch's augmented activations: their shards go
            val_loss, val_acc, correct = self.evaluate(scored)
            record = {
                "recipe": self.name,
                "epoch": epoch,
                "phase": state["phase"] + 1,
                "blocks": blocks,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": max(group["lr"] for group in optimizer.param_groups),
            }
            phase_over = _record_epoch(state, record, correct, self.scored, epochs, params.patience)
            state["elapsed_s"] = _clock() - started
            self.last = _payload(
                self.identity, self.model, self.ema, state, names, optimizer, scheduler
            )
            if self.path is not None:
                _write_resumable(self.path, self.last)
            if on_epoch is not None:
                on_epoch(record, self.scored)
            if phase_over:
                return False
        return False

    def mixing_weight(self) -> float:
        """Manifold mixup's weight of each example for the next batch (1: not mixed), drawn from
        Beta(alpha, alpha) by NumPy's stream, which each epoch seeds. Written here rather than
        with timm's ``Mixup``, which refuses the odd-sized last batch."""
        alpha = self.params.mixup_alpha
        return float(np.random.beta(alpha, alpha)) if alpha > 0 else 1.0

    def train_epoch(self, top, optimizer, scheduler, train_h, epoch, state, steps) -> float:
        params, labels = self.params, self.data.train_labels
        generator = torch.Generator().manual_seed(params.seed * 7919 + epoch)
        self.set_train_mode(top)
        total, updates = 0.0, (state["epoch_in_phase"]) * steps
        description = f"finetune {self.name} epoch {epoch} (phase {state['phase'] + 1})"
        with progress(len(labels), description) as bar:
            for batch, inputs in train_h.batches(params.batch_size, generator):
                targets = labels[batch.to(labels.device)]
                weight = self.mixing_weight()
                if weight < 1.0:  # manifold mixup: each activation with the batch's reverse
                    inputs = inputs * weight + inputs.flip(0) * (1.0 - weight)
                with self._autocast():
                    logits = top(inputs).float()
                loss = self.loss_fn(logits, targets)
                if weight < 1.0:
                    loss = weight * loss + (1.0 - weight) * self.loss_fn(logits, targets.flip(0))
                if not torch.isfinite(loss.detach()):
                    kept = (
                        f"the last good checkpoint (epoch {state['epoch']}) is kept at {self.path}"
                        if self.path is not None and state["epoch"] > 0
                        else "no checkpoint was written"
                    )
                    raise FinetuneError(
                        f"Fine-tuning stopped: the training loss became {loss.item()} in epoch "
                        f"{epoch} (phase {state['phase'] + 1}); {kept}, and no model was "
                        f"written. Lower finetune.lr (now {params.lr}) or check the images."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                updates += 1
                scheduler.step_update(updates)
                total += loss.item() * len(batch)
                bar.update(len(batch))
            bar.set_postfix(loss=f"{total / len(labels):.4f}")
        return total / len(labels)


def _initial_state(
    model: nn.Module, head_loss: float, head_acc: float, head_correct: list[bool]
) -> dict[str, Any]:
    """A run's progress before its first epoch: the head alone is epoch 0 and the best so far."""
    return {
        "phase": 0,
        "epoch_in_phase": 0,
        "epoch": 0,
        "best_score": [head_acc, math.inf],  # the head wins every tie in accuracy
        "best_epoch": 0,
        "best_correct": head_correct,  # per val image, of the best so far
        "trained_best": None,  # the best trained epoch's score, epoch and val correctness
        "best_state": copy.deepcopy(model.state_dict()),
        "phase_best": None,
        "stale": 0,
        "elapsed_s": 0.0,
        "history": [
            {
                "epoch": 0,
                "phase": 0,
                "blocks": 0,
                "train_loss": float("nan"),
                "val_loss": head_loss,
                "val_accuracy": head_acc,
                "lr": 0.0,
            }
        ],
        "stopped": "completed",
        "trial": None,  # the trial's outcome, once it has run
    }


def _resume_phase(checkpoint, state, names, optimizer, scheduler, path) -> None:
    """Continue the interrupted phase's optimizer and schedule, and the random streams."""
    if state["epoch_in_phase"] > 0:  # stopped mid-phase: continue its optimizer
        if checkpoint["trainable"] != names:
            raise FinetuneError(f"{path} trains other parameters than this phase.")
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    _restore_random_state(checkpoint["random"])


def _record_epoch(
    state: dict[str, Any],
    record: dict[str, Any],
    correct: list[bool],
    model: nn.Module,
    epochs: int,
    patience: int,
) -> bool:
    """Add the epoch to ``state`` (history, best so far, early stopping); True if its phase is
    over (it ran all its epochs or ``patience`` of them without a new best)."""
    state["history"].append(record)
    state["epoch"], state["epoch_in_phase"] = record["epoch"], state["epoch_in_phase"] + 1
    score = [record["val_accuracy"], -record["val_loss"]]
    if score > state["best_score"]:
        state["best_score"], state["best_epoch"] = score, record["epoch"]
        state["best_state"], state["best_correct"] = copy.deepcopy(model.state_dict()), correct
    trained = state["trained_best"]
    if trained is None or score > trained["score"]:
        state["trained_best"] = {"score": score, "epoch": record["epoch"], "correct": correct}
    if state["phase_best"] is None or score > state["phase_best"]:
        state["phase_best"], state["stale"] = score, 0
    else:
        state["stale"] += 1
    phase_over = state["stale"] >= patience or state["epoch_in_phase"] >= epochs
    if phase_over:
        state["phase"] += 1
        state["epoch_in_phase"], state["phase_best"], state["stale"] = 0, None, 0
    return phase_over


def _cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy on the CPU, sharing nothing with the live tensors."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _payload(identity, model, ema, state, names, optimizer, scheduler) -> dict[str, Any]:
    """A resume checkpoint: a copy, so that it stays what it was while training goes on."""
    return {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": identity,
        "model": _cpu(model.state_dict()),
        "ema": _cpu(ema.module.state_dict()) if ema is not None else None,
        "state": {
            **copy.deepcopy({k: v for k, v in state.items() if k != "best_state"}),
            "best_state": _cpu(state["best_state"]),
        },
        "trainable": names,
        "frozen": sorted(set(dict(model.named_parameters())) - set(names)),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "random": _random_state(),
    }


def _write_resumable(path: Path, payload: dict[str, Any]) -> None:
    # Saved through a file object: torch names the archive inside after a path it is given,
    # and a temporary name would make identical models differ in bytes.
    with replacing(path) as temporary, open(temporary, "wb") as file:
        torch.save(payload, file)


def _load_resumable(path: Path | None, identity: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this exact configuration, else None."""
    if path is None or not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: start afresh, say so
        print(f"finetune: ignoring unreadable checkpoint {path} ({exc}); starting afresh")
        return None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        print(f"finetune: {path} is not a graft fine-tuning checkpoint; starting afresh")
        return None
    if payload.get("fingerprint") != identity:
        print(
            f"finetune: {path} belongs to a different configuration (params, data, head or "
            "backbone changed); starting afresh"
        )
        return None
    return payload
