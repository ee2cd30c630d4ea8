"""The engine on the toy data: learning, the run directory, resume, transfer and export."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import corex
from corex.errors import CorexError
from corex.plugins import register
from corex.testing import ToySource


def run(recipe_dict, out, **kwargs):
    return corex.run(corex.load_recipe(recipe_dict), out=out, progress=False, **kwargs)


def test_a_tiny_multi_task_run_learns_and_writes_the_contracted_run_directory(tiny_recipe, tmp_path):
    tiny_recipe["stages"]["train"]["epochs"] = 4
    out = tmp_path / "run"
    results = run(tiny_recipe, out)
    test = results["stages"]["test"]["metrics"]
    assert test["macro_f1"] > 0.6, test  # chance is 0.25; each toy class has its own quadrant
    assert test["dice"] > 0.3, test
    for name in ("recipe.yaml", "plugins.json", "metrics.jsonl", "results.json", "data.json", "curves.png", "README.md"):
        assert (out / name).exists(), name
    for name in ("last.pt", "best.pt", "model.pt"):
        assert (out / "checkpoints" / "train" / name).exists(), name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert set(results) == {"recipe", "stages"} and results["recipe"] == "tiny"
    for metric in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "dice", "iou"):
        assert isinstance(test[metric], float)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 and "val/macro_f1" in r for r in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert results["stages"]["train"]["best_epoch"] in {1, 2, 3, 4}
    assert (out / "test" / "confusion_matrix.png").exists()
    lo, hi = results["stages"]["test"]["intervals"]["macro_f1"]
    assert lo <= test["macro_f1"] <= hi
    # The resolved recipe reloads to the same recipe.
    assert corex.load_recipe(out / "recipe.yaml").digest() == corex.load_recipe(tiny_recipe).digest()


class StopAfterFirstEpoch:
    """An observer that interrupts the run like Ctrl-C once epoch 1 of a stage is saved."""

    stage = "train"

    @classmethod
    @corex.hookimpl
    def corex_epoch_end(cls, stage, epoch):
        if stage == cls.stage and epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize("interrupted_stage", ["train", "finetune"])
def test_resume_after_an_interruption_gives_the_same_results(tiny_recipe, tmp_path, corex_pm, interrupted_stage):
    tiny_recipe["stages"]["train"]["epochs"] = 2
    tiny_recipe["stages"]["train"]["augment"] = "cxr_light"  # global-RNG consumers must resume too
    tiny_recipe["stages"]["train"]["heads"]["classification"]["dropout"] = 0.3
    stages = tiny_recipe["stages"]
    stages["finetune"] = {"kind": "train", "epochs": 2, "heads": {"classification": {"dropout": 0.3}},
                          "evaluators": [{"name": "classification", "bootstrap": 0}], "select": "macro_f1"}
    stages["test"] = stages.pop("test")
    uninterrupted = run(tiny_recipe, tmp_path / "a")

    StopAfterFirstEpoch.stage = interrupted_stage
    register(corex_pm, StopAfterFirstEpoch, name="stopper")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_recipe, tmp_path / "b")
    corex_pm.unregister(name="stopper")
    resumed = run(tiny_recipe, tmp_path / "b", resume=True)

    for stage in ("train", "finetune", "test"):
        assert resumed["stages"][stage]["metrics"] == uninterrupted["stages"][stage]["metrics"], stage
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "train_time_s")} for r in rows]  # noqa: E731
    assert strip(rows_b) == strip(rows_a)


def test_resume_refuses_a_different_recipe_and_a_fresh_run_refuses_a_used_folder(tiny_recipe, tmp_path):
    tiny_recipe["stages"]["train"]["epochs"] = 1
    run(tiny_recipe, tmp_path / "r")
    with pytest.raises(CorexError, match="already holds files"):
        run(tiny_recipe, tmp_path / "r")
    tiny_recipe["seed"] = 1
    with pytest.raises(CorexError, match="the recipe differs"):
        run(tiny_recipe, tmp_path / "r", resume=True)
    with pytest.raises(CorexError, match="no run to resume"):
        run(tiny_recipe, tmp_path / "nothing", resume=True)


class Bright(ToySource):
    """Toy images in 0..255: the normalisation mistake the engine must refuse."""

    def split(self, name, label_fraction=1.0):
        dataset = super().split(name, label_fraction)
        dataset.items = [{**item, "image": item["image"] * 255} for item in dataset.items]
        return dataset


class BrightPlugin:
    @staticmethod
    @corex.hookimpl
    def corex_datasets():
        return {"bright": Bright}


def test_a_first_batch_outside_zero_one_is_an_error(tiny_recipe, tmp_path, corex_pm):
    register(corex_pm, BrightPlugin, name="bright")
    tiny_recipe["data"]["name"] = "bright"
    with pytest.raises(CorexError, match=r"first batch has intensities in \[0\.\d+, 2\d\d\], but corex expects \[0, 1\]"):
        run(tiny_recipe, tmp_path / "r")


def test_a_plugin_value_error_is_reported_with_the_recipe_path(tiny_recipe, tmp_path):
    tiny_recipe["stages"]["train"]["augment"] = {"name": "kornia", "ops": [{"RandomAfine": {"degrees": 5}}]}
    tiny_recipe["stages"]["train"]["heads"]["classification"]["class_weights"] = [1.0, 2.0]
    with pytest.raises(corex.recipe.RecipeError) as info:
        run(tiny_recipe, tmp_path / "r")
    problems = info.value.problems
    assert any(p.startswith("stages.train.augment: ") and "RandomAffine" in p for p in problems), problems
    assert any(p.startswith("stages.train.heads.classification: ") for p in problems), problems


def test_an_unknown_selection_metric_is_refused_before_training_naming_the_declared_ones(tiny_recipe, tmp_path, corex_cli):
    tiny_recipe["stages"]["train"]["select"] = "macro_f2"
    with pytest.raises(corex.recipe.RecipeError, match="'macro_f2' is not a metric this stage's evaluators declare.*did you mean 'macro_f1'"):
        run(tiny_recipe, tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # refused before any training
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    code, _, err = corex_cli("validate", path)  # validate says so too
    assert code == 2 and "stages.train.select.metric" in err and "Traceback" not in err


def test_a_selection_metric_that_is_never_finite_ends_the_stage_with_a_message(corex_pm, tiny_recipe, tmp_path, corex_cli):
    class AlwaysNaN:  # declares its metric, computes NaN every time (with a reason, as the contract asks)
        def __init__(self):
            self.reset()

        def reset(self):
            pass

        def update(self, batch, outputs):
            pass

        def compute(self):
            return {"never": float("nan")}

        def undefined(self):
            return {"never": "nothing to measure on the validation split"}

    class Plugin:
        @staticmethod
        @corex.hookimpl
        def corex_evaluators():
            return {"never_finite": AlwaysNaN}

        @staticmethod
        @corex.hookimpl
        def corex_metrics():
            from corex.metrics import Metric

            return [Metric("never", "a metric that is never finite")]

    corex_pm.register(Plugin, name="nan-plugin")
    tiny_recipe["stages"]["train"]["evaluators"] = ["never_finite"]
    tiny_recipe["stages"]["train"]["select"] = "never"
    tiny_recipe["stages"]["train"]["epochs"] = 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    code, _, err = corex_cli("run", path, "--out", tmp_path / "run")
    assert code == 1 and "Traceback" not in err, err
    assert "stages.train.select.metric: 'never' was not a finite number at any of the 2 validations" in err
    assert not (tmp_path / "run" / "results.json").exists() or "train" not in json.loads((tmp_path / "run" / "results.json").read_text())["stages"]


def test_export_then_transfer_from_the_file_and_a_clear_error_on_another_architecture(tiny_recipe, tmp_path, corex_cli):
    tiny_recipe["stages"]["train"]["epochs"] = 1
    run(tiny_recipe, tmp_path / "src")
    code, out, err = corex_cli("export", tmp_path / "src", "--stage", "train", "--encoder-only", tmp_path / "enc.pt")
    assert code == 0, err
    state = torch.load(tmp_path / "enc.pt", weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith("encoder.") for k in state)
    meta = json.loads((tmp_path / "enc.json").read_text())
    assert meta["arch"] == "resnet18" and meta["input_size"] == 32 and meta["in_channels"] == 1
    assert len(meta["recipe_hash"]) == 16 and "encoders" in meta["plugins"]

    encoder = corex.build_model(corex.load_recipe(tiny_recipe), 4).encoder
    encoder.load_state_dict(state)  # clean keys: no surgery

    tiny_recipe["stages"] = {"probe": {
        "kind": "train", "epochs": 1, "encoder_from": str(tmp_path / "enc.pt"), "freeze": True,
        "heads": {"classification": {}}, "evaluators": [{"name": "classification", "bootstrap": 0}],
    }}
    run(tiny_recipe, tmp_path / "probe")
    probed = torch.load(tmp_path / "probe" / "checkpoints" / "probe" / "model.pt", weights_only=False)["model"]
    for key, value in state.items():  # a linear probe leaves the transferred encoder untouched
        assert torch.equal(probed[f"encoder.{key}"], value), key

    tiny_recipe["model"]["encoder"]["name"] = "resnet34"
    with pytest.raises(CorexError, match="holds a resnet18 encoder, but this recipe's encoder is resnet34"):
        run(tiny_recipe, tmp_path / "mismatch")


def test_python_api_building_blocks(tiny_recipe, tmp_path):
    recipe = corex.load_recipe(tiny_recipe)
    source = corex.build_data(recipe)
    model = corex.build_model(recipe, len(source.class_names))
    assert set(model.heads) == {"classification", "segmentation"}
    loader = corex.make_loader(source.split("test"), batch_size=4)
    metrics, intervals = corex.evaluate(model, loader, ["classification", "segmentation"], source.class_names,
                                        evaluators=[{"name": "classification", "bootstrap": 20}, "segmentation"])
    assert metrics["n"] == 32 and 0.0 <= metrics["dice"] <= 1.0
    assert "macro_f1" in intervals


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_mixed_precision_path_trains_and_evaluates(tiny_recipe, tmp_path, monkeypatch, amp):
    """bf16 autocast (what `amp: auto` picks on recent GPUs) through heads, losses and evaluators: the
    encoder's activations really are bfloat16 in training steps, validation and the evaluate stage
    (float32 with amp: off), and the loss stays finite."""
    from corex import evaluation, training

    tiny_recipe["stages"]["train"]["epochs"] = 1
    tiny_recipe["stages"]["train"]["amp"] = amp
    tiny_recipe["stages"]["train"]["grad_clip"] = 1.0
    tiny_recipe["stages"]["test"]["amp"] = amp
    seen: dict[str, set] = {"train": set(), "evaluate": set()}
    phase = ["train"]

    def record(module, inputs, output):
        seen[phase[0]].add(output[-1].dtype)

    real_step, real_evaluate = training._step_loss, evaluation.evaluate_loader

    def step_loss(session, loop, batch, first=False):
        if not session.model.encoder._forward_hooks:
            session.model.encoder.register_forward_hook(record)
        phase[0] = "train"
        return real_step(session, loop, batch, first)

    def evaluate_loader(*args, **kwargs):
        phase[0] = "evaluate"
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            phase[0] = "train"

    monkeypatch.setattr(training, "_step_loss", step_loss)
    monkeypatch.setattr(training, "evaluate_loader", evaluate_loader)
    monkeypatch.setattr(evaluation, "evaluate_loader", evaluate_loader)
    results = run(tiny_recipe, tmp_path / "r")
    expected = {torch.bfloat16} if amp == "bf16" else {torch.float32}
    assert seen == {"train": expected, "evaluate": expected}
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)
    assert 0.0 <= results["stages"]["test"]["metrics"]["macro_f1"] <= 1.0


def test_autocast_choice_per_device():
    from corex.loaders import autocast_dtype
    from corex.recipe import Stage

    assert autocast_dtype(Stage(name="s", kind="train"), torch.device("cpu")) is None  # float32 on CPU
    assert autocast_dtype(Stage(name="s", kind="train", amp="fp16"), torch.device("cpu")) is torch.float16
    assert autocast_dtype(Stage(name="s", kind="train", amp="off"), torch.device("cuda")) is None
    assert autocast_dtype(Stage(name="s", kind="train", amp="bf16"), torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype(Stage(name="s", kind="train", amp="fp16"), torch.device("cuda")) is torch.float16


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_picks_bf16_on_a_gpu_that_has_it_else_fp16(monkeypatch, bf16, expected):
    from corex.loaders import autocast_dtype
    from corex.recipe import Stage

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert autocast_dtype(Stage(name="s", kind="train"), torch.device("cuda")) is expected
    assert autocast_dtype(Stage(name="s", kind="train", amp="auto"), torch.device("cuda", 1)) is expected
    assert autocast_dtype(Stage(name="s", kind="train"), torch.device("mps")) is None


def test_a_diverging_loss_stops_the_run_with_a_message(tiny_recipe, tmp_path):
    tiny_recipe["stages"]["train"]["epochs"] = 1
    tiny_recipe["optimizer"]["lr"] = 1e12  # diverges within a few steps
    tiny_recipe["stages"]["train"]["heads"]["segmentation"]["weight"] = 0.0
    with pytest.raises(CorexError, match=r"stages.train: the loss became (nan|inf) by epoch 1, step \d+; lower the learning rate"):
        run(tiny_recipe, tmp_path / "r")
