"""LP-FT on real digits with a tiny random-weight timm model: phases, BatchNorm policies, resume,
the NaN stop, and parameter errors."""

from __future__ import annotations

import copy
import gc
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import graft.finetune as finetune_module
from graft.backbones import create_backbone
from graft.config import FinetuneParams, ParamsError, parse_params
from graft.engines import make_runner
from graft.finetune import (
    FinetuneError,
    augment_transform,
    check_schedule,
    choose_recipe,
    finetune,
    recipes_of,
    trainable_names,
)
from graft.preprocessing import eval_transform
from graft.sample_data import write_sample_data

BLOCKS = 5  # test_efficientnet has 5 entries in `blocks`


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    data = tmp_path_factory.mktemp("finetune") / "data"
    write_sample_data(data, per_class=5)
    paths = sorted(data.rglob("*.png"))
    labels = np.array([int(p.parent.name) for p in paths])
    val = np.arange(len(paths)) % 5 == 0
    backbone = create_backbone("test_efficientnet", "random", num_classes=10)
    return {
        "train": ([p for p, v in zip(paths, val, strict=True) if not v], labels[~val]),
        "val": ([p for p, v in zip(paths, val, strict=True) if v], labels[val]),
        "model": backbone.model,
        "data_config": backbone.data_config,
    }


def settings(**overrides) -> FinetuneParams:
    base = {"unfreeze_blocks": 1, "epochs": 2, "batch_size": 8, "lr": 0.01, "patience": 10}
    return FinetuneParams(**{**base, **overrides})


def run(digits, params: FinetuneParams, **kwargs):
    model = copy.deepcopy(digits["model"])
    (train_paths, train_y), (val_paths, val_y) = digits["train"], digits["val"]
    config = digits["data_config"]
    train_transform = augment_transform(config, params.augment) if params.augment.enabled else None
    result = finetune(
        model,
        train_paths,
        train_y,
        val_paths,
        val_y,
        eval_transform(config),
        config.input_size,
        params,
        "onnxruntime",
        train_transform=train_transform,
        **kwargs,
    )
    return result, model


def test_each_phase_trains_its_top_blocks_and_the_head_only(digits):
    seen: dict[int, set[str]] = {}

    def record(epoch: dict, model) -> None:
        seen[epoch["phase"]] = {n for n, p in model.named_parameters() if p.requires_grad}

    params = settings(unfreeze_blocks=[1, 3], epochs=[1, 1])
    result, _ = run(digits, params, on_epoch=record)
    head_and_neck = {"conv_head.weight", "bn2.weight", "bn2.bias"} | {
        "classifier.weight",
        "classifier.bias",
    }
    for phase, first_block in ((1, 4), (2, 2)):
        blocks = {name.split(".")[1] for name in seen[phase] if name.startswith("blocks.")}
        assert blocks == {str(b) for b in range(first_block, BLOCKS)}
        assert head_and_neck <= seen[phase]
        assert not any(name.startswith(("conv_stem", "bn1")) for name in seen[phase])
    assert seen[1] < seen[2] == set(trainable_names(digits["model"], 3))
    # What was never trained is bit for bit the pretrained model.
    initial = digits["model"].state_dict()
    for key, value in result.state_dict.items():
        if key.startswith(("conv_stem", "bn1", "blocks.0", "blocks.1")):
            assert torch.equal(value, initial[key]), key


def _running_stats(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in state.items()
        if k.startswith(prefix) and k.endswith(("running_mean", "running_var"))
    }


def _state_after_training(digits, params: FinetuneParams) -> dict[str, torch.Tensor]:
    """The model's state after its last epoch (not the best one, which may be the head)."""
    states = []

    def snapshot(_epoch: dict, model) -> None:
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    run(digits, params, on_epoch=snapshot)
    return states[-1]


def test_frozen_batchnorm_statistics_never_change(digits):
    state = _state_after_training(digits, settings(unfreeze_blocks=2, bn="frozen"))
    initial = digits["model"].state_dict()
    stats = _running_stats(state, "")
    assert len(stats) > 20
    for key, value in stats.items():
        assert torch.equal(value, initial[key]), key
    trained = "blocks.4.0.conv_pw.weight"
    assert not torch.equal(state[trained], initial[trained])


def test_adapting_batchnorm_statistics_change_in_the_trained_blocks_only(digits):
    state = _state_after_training(digits, settings(unfreeze_blocks=2, bn="adapt", epochs=1))
    initial = digits["model"].state_dict()
    for prefix in ("blocks.3.", "blocks.4.", "bn2."):
        stats = _running_stats(state, prefix)
        assert stats and all(not torch.allclose(v, initial[k]) for k, v in stats.items()), prefix
    for prefix in ("bn1.", "blocks.0.", "blocks.1.", "blocks.2."):
        for key, value in _running_stats(state, prefix).items():
            assert torch.equal(value, initial[key]), key


def test_auto_batchnorm_policy_keeps_frozen_unless_adapt_is_ahead_beyond_noise(digits):
    result, _ = run(digits, settings(bn="auto", epochs=1))
    assert set(result.candidates) == {"frozen", "adapt"}  # the two policies are two recipes
    ahead = result.choice["gain_over_default_ci95"]["adapt"][0] > 0
    assert result.bn == ("adapt" if ahead else "frozen") == result.recipe
    # A policy's trial is scored by its best trained epoch (the head is both policies' start).
    assert result.candidates[result.bn] == max(r["val_accuracy"] for r in result.history[1:])


class Killed(Exception):
    """Stands for the process being killed between two epochs."""


def killed_after(digits, params: FinetuneParams, last_epoch: int, directory: Path) -> Path:
    """Run until ``last_epoch``'s checkpoint is written, then stop as if killed; its path."""

    def kill(epoch: dict, _model) -> None:
        if epoch["epoch"] == last_epoch:
            raise Killed

    with pytest.raises(Killed):
        run(digits, params, checkpoint_dir=directory, on_epoch=kill)
    (saved,) = directory.glob("*.resume.pt")
    return saved


def test_a_killed_run_resumes_to_the_uninterrupted_result(digits, tmp_path: Path):
    params = settings(
        unfreeze_blocks=[1, 2],
        epochs=[2, 2],
        bn="adapt",
        augment={"enabled": True, "scale": [0.6, 1.0]},
    )
    uninterrupted, _ = run(digits, params, checkpoint_dir=tmp_path / "a")
    checkpoint = torch.load(killed_after(digits, params, 3, tmp_path / "b"), weights_only=True)
    assert (checkpoint["state"]["epoch"], checkpoint["state"]["phase"]) == (3, 1)
    assert {n.split(".")[1] for n in checkpoint["trainable"] if n.startswith("blocks.")} == {
        "3",
        "4",
    }
    assert {n.split(".")[1] for n in checkpoint["frozen"] if n.startswith("blocks.")} == {
        "0",
        "1",
        "2",
    }
    groups = checkpoint["optimizer"]["param_groups"]
    assert len({group["lr_scale"] for group in groups}) > 1  # layer-wise decay
    resumed, _ = run(digits, params, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_at_epoch == 3  # mid-phase 2
    assert len(resumed.history) == len(uninterrupted.history) == 5
    for mine, theirs in zip(resumed.history, uninterrupted.history, strict=True):
        assert mine["phase"] == theirs["phase"]
        assert mine["val_accuracy"] == pytest.approx(theirs["val_accuracy"], abs=1e-6)
        if math.isfinite(theirs["train_loss"]):
            assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
    assert resumed.best_epoch == uninterrupted.best_epoch
    for key, value in uninterrupted.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, atol=1e-4, rtol=1e-4)


def test_a_checkpoint_of_another_configuration_is_never_resumed(digits, tmp_path: Path):
    def kill_after_epoch_1(epoch: dict, _model) -> None:
        if epoch["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        run(digits, settings(), checkpoint_dir=tmp_path, on_epoch=kill_after_epoch_1)
    assert list(tmp_path.glob("*.resume.pt"))
    other_lr, _ = run(digits, settings(lr=0.02), checkpoint_dir=tmp_path)
    assert other_lr.resumed_at_epoch is None and len(other_lr.history) == 3
    other_data, _ = run(digits, settings(), checkpoint_dir=tmp_path, config_id="other images")
    assert other_data.resumed_at_epoch is None


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(digits, tmp_path: Path):
    saved: dict[str, bytes] = {}

    def poison_after_epoch_1(epoch: dict, model) -> None:
        if epoch["epoch"] == 1:
            (path,) = tmp_path.glob("*.resume.pt")
            saved["bytes"] = path.read_bytes()
            with torch.no_grad():
                model.get_classifier().weight.fill_(float("nan"))

    with pytest.raises(FinetuneError, match="loss became nan in epoch 2") as error:
        run(digits, settings(), checkpoint_dir=tmp_path, on_epoch=poison_after_epoch_1)
    assert "last good checkpoint (epoch 1) is kept" in str(error.value)
    assert "finetune.lr" in str(error.value)
    (path,) = tmp_path.glob("*.resume.pt")
    assert path.read_bytes() == saved["bytes"]
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["state"]["epoch"] == 1
    assert all(
        torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point()
    )


def test_unfreezing_more_blocks_than_the_backbone_has_is_refused(digits):
    with pytest.raises(FinetuneError, match="finetune.unfreeze_blocks is 9, but the backbone has"):
        check_schedule(digits["model"], settings(unfreeze_blocks=[1, 9], epochs=[1, 1]))


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"finetune": {"lr": 0}}, "finetune.lr"),
        ({"finetune": {"lr": -0.001}}, "finetune.lr"),
        ({"head": {"lr": 0}}, "head.lr"),
        ({"finetune": {"epochs": -1}}, "finetune.epochs"),
        ({"finetune": {"unfreeze_blocks": [1, 2], "epochs": [3, -1]}}, "finetune.epochs"),
        ({"finetune": {"unfreeze_blocks": [1, 2], "epochs": [3]}}, "finetune.epochs"),
        ({"finetune": {"unfreeze_blocks": [3, 1], "epochs": [1, 1]}}, "finetune.unfreeze_blocks"),
        ({"finetune": {"unfreeze_blocks": 0}}, "finetune.unfreeze_blocks"),
        ({"finetune": {"bn": "moving"}}, "finetune.bn"),
        ({"finetune": {"layer_decay": 1.5}}, "finetune.layer_decay"),
        ({"finetune": {"max_minutes": 0}}, "finetune.max_minutes"),
        ({"finetune": {"augment": {"hflip": 2}}}, "finetune.augment.hflip"),
        ({"finetune": {"augment": {"scale": [1.0, 0.5]}}}, "finetune.augment.scale"),
        ({"head": {"epochs": -3}}, "head.epochs"),
        ({"head": {"kind": "transformer"}}, "head.kind"),
    ],
)
def test_invalid_training_parameters_name_their_key(raw, key):
    with pytest.raises(ParamsError, match=f"key '{key}'"):
        parse_params(raw)


def test_the_augmentation_never_flips_by_default_and_keeps_the_input_size(digits):
    params = parse_params({"finetune": {"augment": {"enabled": True}}}).finetune
    transform = augment_transform(digits["data_config"], params.augment)
    assert "Flip" not in repr(transform)
    from graft.data.images import load_image

    image = load_image(digits["train"][0][0])
    assert tuple(transform(image).shape) == tuple(digits["data_config"].input_size)


def test_a_phase_of_zero_epochs_is_skipped(digits):
    result, _ = run(digits, settings(unfreeze_blocks=[1, 2], epochs=[0, 1]))
    assert [(r["epoch"], r["phase"], r["blocks"]) for r in result.history[1:]] == [(1, 2, 2)]


# --- the recipe portfolio (finetune.recipes) ---


def test_the_invariance_recipes_exist_only_when_invariances_are_declared():
    params = settings(recipes=["top1-frozen", "top2-adapt"], epochs=3)
    plain = recipes_of(params)
    assert [(r.name, r.phases, r.bn, r.invariant) for r in plain] == [
        ("top1-frozen", ((1, 3),), "frozen", False),
        ("top2-adapt", ((2, 3),), "adapt", False),
    ]
    declared = [r.name for r in recipes_of(params, ["hflip", "rot90"])]
    assert declared == ["top1-frozen", "top1-frozen+inv", "top2-adapt", "top2-adapt+inv"]
    # Without recipes: the section's own schedule, on the invariances when declared.
    assert [r.name for r in recipes_of(settings(bn="auto"), ["vflip"])] == [
        "frozen+inv",
        "adapt+inv",
    ]


@pytest.mark.parametrize("name", ["top0-frozen", "top2", "top2-moving", "bottom2-adapt"])
def test_an_unknown_recipe_is_refused_naming_the_key(name):
    with pytest.raises(ParamsError, match="key 'finetune.recipes'"):
        parse_params({"finetune": {"recipes": ["top2-frozen", name]}})


def test_a_recipe_deeper_than_the_backbone_is_refused(digits):
    with pytest.raises(FinetuneError, match="finetune.recipes has top9-adapt"):
        check_schedule(digits["model"], settings(recipes=["top1-frozen", "top9-adapt"]))


def test_the_default_recipe_is_kept_unless_another_is_ahead_beyond_noise():
    right, wrong = [True] * 60, [False] * 60
    close = {"a": {"val_correct": right + wrong}, "b": {"val_correct": right + [True] + wrong[1:]}}
    assert choose_recipe(close)["recipe"] == "a"  # one image ahead: noise
    assert choose_recipe(close)["gain_over_default_ci95"]["b"][0] <= 0.0
    clear = {
        "a": {"val_correct": right + wrong},
        "b": {"val_correct": right + right[:30] + wrong[:30]},
        "c": {"val_correct": right + right[:40] + wrong[:20]},
    }
    choice = choose_recipe(clear)
    assert choice["recipe"] == "c" and choice["default"] == "a"
    assert choice["val_accuracy"] == {"a": 0.5, "b": 0.75, "c": pytest.approx(5 / 6)}
    tie = {"a": clear["a"], "b": clear["c"], "c": clear["c"]}
    assert choose_recipe(tie)["recipe"] == "b"  # a tie goes to the earlier


PORTFOLIO = {"recipes": ["top1-frozen", "top2-adapt"], "epochs": 3, "trial_epochs": 1}


def test_each_recipe_is_tried_and_the_chosen_one_continues_from_its_trial(digits):
    seen = []
    result, _ = run(digits, settings(**PORTFOLIO), on_epoch=lambda r, _m: seen.append(r))
    assert [(r["recipe"], r["epoch"]) for r in seen[:2]] == [("top1-frozen", 1), ("top2-adapt", 1)]
    assert set(result.trials) == {"top1-frozen", "top2-adapt"}
    for name, trial in result.trials.items():
        assert trial["epochs"] == 1 and trial["seconds"] > 0.0
        first = next(r for r in seen if r["recipe"] == name)
        assert trial["val_accuracy"] == first["val_accuracy"] and trial["best_epoch"] == 1
    assert result.choice["recipe"] == result.recipe == choose_recipe_of(result)
    # The chosen recipe went on from its trial's epoch 1 to its full schedule, never repeating it.
    continued = [(r["recipe"], r["epoch"]) for r in seen[2:]]
    assert continued == [(result.recipe, 2), (result.recipe, 3)]
    assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]
    assert result.bn == ("frozen" if result.recipe == "top1-frozen" else "adapt")


def choose_recipe_of(result) -> str:
    return result.choice["recipe"]


def test_the_invariance_recipes_train_on_transformed_images(digits, monkeypatch):
    drawn = []
    draw = finetune_module.RandomInvariance.__call__

    def counted(self, image):
        drawn.append(self.invariances)
        return draw(self, image)

    monkeypatch.setattr(finetune_module.RandomInvariance, "__call__", counted)
    params = settings(**{**PORTFOLIO, "recipes": ["top1-frozen"]})
    result, _ = run(digits, params, invariances=["hflip"])
    assert list(result.trials) == ["top1-frozen", "top1-frozen+inv"]
    train_images = len(digits["train"][1])
    epochs = 3 if result.recipe == "top1-frozen+inv" else 1  # its trial, or all its epochs
    assert drawn == [("hflip",)] * (train_images * epochs)


def test_a_run_killed_after_the_trials_resumes_to_the_uninterrupted_result(digits, tmp_path):
    params = settings(**PORTFOLIO)
    uninterrupted, _ = run(digits, params, checkpoint_dir=tmp_path / "a")
    epochs = []

    def kill_in_the_continuation(epoch: dict, _model) -> None:
        epochs.append(epoch["recipe"])
        if len(epochs) == 3:  # both trials, then the first epoch of the continuation
            raise Killed

    with pytest.raises(Killed):
        run(digits, params, checkpoint_dir=tmp_path / "b", on_epoch=kill_in_the_continuation)
    assert len(list((tmp_path / "b").glob("finetune-top*.resume.pt"))) == 2
    again = []
    resumed, _ = run(
        digits, params, checkpoint_dir=tmp_path / "b", on_epoch=lambda r, _m: again.append(r)
    )
    assert [r["epoch"] for r in again] == [3]  # neither trial nor epoch 2 ran again
    assert resumed.resumed_at_epoch == 2
    assert resumed.recipe == uninterrupted.recipe and resumed.trials == uninterrupted.trials | {
        name: {**trial, "seconds": resumed.trials[name]["seconds"]}
        for name, trial in uninterrupted.trials.items()
    }
    for mine, theirs in zip(resumed.history, uninterrupted.history, strict=True):
        assert mine["val_accuracy"] == pytest.approx(theirs["val_accuracy"], abs=1e-6)
    for key, value in uninterrupted.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, atol=1e-4, rtol=1e-4)


def test_the_trials_and_the_continuation_share_the_time_budget(digits, monkeypatch):
    clock = iter(range(0, 10**6, 10))  # every reading of the clock: 10 s later
    monkeypatch.setattr(finetune_module, "_clock", lambda: float(next(clock)))
    result, _ = run(digits, settings(**{**PORTFOLIO, "epochs": 50, "max_minutes": 4.0}))
    assert all(trial["seconds"] <= 120.0 for trial in result.trials.values())  # each its share
    assert "time budget" in result.stopped and 2 <= len(result.history) - 1 < 50
    assert result.seconds <= 240.0  # the trials and the continuation together


def test_the_frozen_prefix_session_is_released_before_training(digits, monkeypatch):
    """Bounded memory: without augmentation the prefix runs once, so its onnxruntime session
    (and the arena its runs grew) is gone while the top trains."""
    made = []

    def tracked(*args, **kwargs):
        runner = make_runner(*args, **kwargs)
        made.append(weakref.ref(runner))
        return runner

    monkeypatch.setattr(finetune_module, "make_runner", tracked)
    alive = []

    def on_epoch(_record, _model):
        gc.collect()
        alive.append(sum(ref() is not None for ref in made))

    run(digits, settings(), on_epoch=on_epoch)
    assert len(made) == 1 and alive == [0, 0]


# --- the weight average (finetune.ema_epochs) and manifold mixup (finetune.mixup_alpha) ---


def test_the_weight_average_is_what_is_scored_and_kept(digits, monkeypatch):
    """With ema_epochs, each epoch scores the exponential average of the live weights after
    every step (from the head's), and the model returned is that average at the best epoch."""
    scores = iter(np.linspace(0.1, 0.2, 20))  # every later epoch better on val: the last kept
    monkeypatch.setattr(finetune_module, "accuracy", lambda *_: float(next(scores)))
    params = settings(ema_epochs=1.0, epochs=3)
    steps = math.ceil(len(digits["train"][1]) / params.batch_size)
    decay = math.exp(-1.0 / (params.ema_epochs * steps))
    model = copy.deepcopy(digits["model"])
    by_hand = {k: v.detach().clone().double() for k, v in model.state_dict().items()}

    def average(_optimizer, _args, _kwargs) -> None:
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                by_hand[key].mul_(decay).add_(value.double(), alpha=1.0 - decay)

    scored, live = [], []

    def snapshot(_record, kept) -> None:
        scored.append({k: v.detach().clone() for k, v in kept.state_dict().items()})
        live.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        assert kept is not model

    hook = register_optimizer_step_post_hook(average)
    try:
        (train_paths, train_y), (val_paths, val_y) = digits["train"], digits["val"]
        config = digits["data_config"]
        result = finetune(
            model, train_paths, train_y, val_paths, val_y, eval_transform(config),
            config.input_size, params, "onnxruntime", on_epoch=snapshot,
        )  # fmt: skip
    finally:
        hook.remove()
    trained = "blocks.4.0.conv_pw.weight"
    for key, value in scored[-1].items():
        torch.testing.assert_close(value.double(), by_hand[key], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(scored[-1][trained], live[-1][trained])  # an average, not the live
    assert result.best_epoch == 3
    kept = scored[-1]
    for key, value in result.state_dict.items():
        assert torch.equal(value, kept[key]), key
    for key, value in model.state_dict().items():  # the model handed back: the average
        assert torch.equal(value, kept[key]), key


def test_without_averaging_or_mixup_the_live_weights_are_scored(digits):
    seen = []
    model = copy.deepcopy(digits["model"])
    (train_paths, train_y), (val_paths, val_y) = digits["train"], digits["val"]
    config = digits["data_config"]
    finetune(
        model, train_paths, train_y, val_paths, val_y, eval_transform(config),
        config.input_size, settings(), "onnxruntime", on_epoch=lambda _r, m: seen.append(m),
    )  # fmt: skip
    assert seen and all(m is model for m in seen)


def test_mixup_changes_the_training_and_is_deterministic_under_a_seed(digits):
    plain, _ = run(digits, settings())
    mixed, _ = run(digits, settings(mixup_alpha=0.4))
    again, _ = run(digits, settings(mixup_alpha=0.4))
    other_seed, _ = run(digits, settings(mixup_alpha=0.4, seed=1))
    losses = [[r["train_loss"] for r in result.history[1:]] for result in (plain, mixed)]
    assert losses[0] != losses[1]
    assert [r["train_loss"] for r in again.history[1:]] == losses[1]
    for key, value in mixed.state_dict.items():
        assert torch.equal(again.state_dict[key], value), key
    assert [r["train_loss"] for r in other_seed.history[1:]] != losses[1]


def test_a_killed_run_with_the_weight_average_and_mixup_resumes_to_the_same_result(
    digits, tmp_path: Path
):
    params = settings(epochs=3, ema_epochs=1.0, mixup_alpha=0.4)
    uninterrupted, _ = run(digits, params, checkpoint_dir=tmp_path / "a")
    saved = killed_after(digits, params, 2, tmp_path / "b")
    assert torch.load(saved, weights_only=True)["ema"] is not None
    resumed, _ = run(digits, params, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_at_epoch == 2
    for mine, theirs in zip(resumed.history, uninterrupted.history, strict=True):
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)
    for key, value in uninterrupted.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, atol=1e-5, rtol=1e-5)


def test_the_weight_average_of_adapting_batchnorm_has_its_own_statistics(digits):
    """The average's BatchNorm statistics are recomputed over train for its own weights, not
    averaged from the live model's."""
    scored, live = [], []
    model = copy.deepcopy(digits["model"])
    (train_paths, train_y), (val_paths, val_y) = digits["train"], digits["val"]
    config = digits["data_config"]

    def snapshot(_record, kept) -> None:
        for states, of in ((scored, kept), (live, model)):
            states.append({k: v.clone() for k, v in _running_stats(of.state_dict(), "").items()})

    params = settings(unfreeze_blocks=2, bn="adapt", epochs=1, ema_epochs=1.0)
    finetune(
        model, train_paths, train_y, val_paths, val_y, eval_transform(config),
        config.input_size, params, "onnxruntime", on_epoch=snapshot,
    )  # fmt: skip
    initial = digits["model"].state_dict()
    for key, value in scored[-1].items():
        if key.startswith(("blocks.3.", "blocks.4.", "bn2.")):  # the trained blocks
            assert not torch.allclose(value, initial[key]), key
            assert not torch.allclose(value, live[-1][key]), key
        else:
            assert torch.equal(value, initial[key]), key
