"""Issue 16: a third-party plugin's mistake ends in ONE clear message naming the culprit.

One recipe per plausible mistake (the components are in tests/boundaries/mistakes.py, registered as
the plugin ``oops-plugin``), each run through the real command line, in-process. What a demanding
plugin author expects, whatever the mistake:

* exit code 2 (1 for a failure only visible at run time: a NaN loss, a select metric NaN at every
  validation), never a Python traceback;
* a message naming the component, its plugin, the recipe key and what was expected.

Run this module on its own with ``python -m pytest -q -p no:cacheprovider -m boundaries tests/boundaries``
(or the file path); ``-n 2`` halves its time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from corex.testing import tiny_recipe_dict  # noqa: F401  (the recipes below are its smaller cousins)

from . import mistakes

pytestmark = [pytest.mark.boundaries, pytest.mark.slow]

PLUGIN = mistakes.PLUGIN


def base_recipe(tmp_path: Path) -> dict[str, Any]:
    """One epoch of two steps on 20 toy studies at 32 px: a second or two."""
    return {
        "name": "oops",
        "seed": 0,
        "data": {"name": "toy", "image_size": 32, "batch_size": 4, "studies": 20, "cache_dir": str(tmp_path / "cache")},
        "model": {"encoder": {"name": "resnet18", "width": 4}},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "stages": {"train": {"kind": "train", "epochs": 1, "max_steps_per_epoch": 2, "heads": {"classification": {}}}},
    }


Edit = Callable[[dict[str, Any]], None]


def head(name: str, key: str = "classification") -> Edit:
    def edit(recipe):
        recipe["stages"]["train"]["heads"] = {key: {"name": name}}

    return edit


def objective(name: str) -> Edit:
    def edit(recipe):
        recipe["stages"] = {"pretrain": {"kind": "pretrain", "epochs": 1, "max_steps_per_epoch": 2, "objective": name}}

    return edit


def evaluate_with(*names: str) -> Edit:
    def edit(recipe):
        recipe["stages"]["test"] = {"kind": "evaluate", "split": "test", "evaluators": list(names)}

    return edit


def augment(name: str) -> Edit:
    def edit(recipe):
        recipe["stages"]["train"]["augment"] = name

    return edit


def data(name: str) -> Edit:
    def edit(recipe):
        recipe["data"]["name"] = name

    return edit


def chain(*edits: Edit) -> Edit:
    def edit(recipe):
        for one in edits:
            one(recipe)

    return edit


def setting(path: str, value: Any) -> Edit:
    def edit(recipe):
        node = recipe
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = value

    return edit


@dataclass(frozen=True)
class Case:
    id: str
    edit: Edit
    key: str  # the recipe key the message must name
    component: str  # the component it must name (its plugin is always oops-plugin)
    expected: tuple[str, ...]  # regular expressions (case-insensitive) for what was expected / what came back
    code: int = 2
    extra: tuple[str, ...] = field(default_factory=tuple)  # literal strings the message must also hold


CASES = [
    # -- objectives (stages.pretrain.objective) --
    Case("objective-returns-tensor", objective("oops_tensor_objective"), "stages.pretrain.objective", "oops_tensor_objective",
         (r"loss", r"mapping|dict")),
    Case("objective-non-scalar-loss", objective("oops_vector_objective"), "stages.pretrain.objective", "oops_vector_objective",
         (r"scalar",)),
    Case("objective-detached-loss", objective("oops_detached_objective"), "stages.pretrain.objective", "oops_detached_objective",
         (r"grad",)),
    Case("objective-nan-loss", objective("oops_nan_objective"), "stages.pretrain.objective", "oops_nan_objective",
         (r"\bnan\b",), code=1),
    Case("objective-raises-inside", objective("oops_crashing_objective"), "stages.pretrain.objective", "oops_crashing_objective",
         (r"RuntimeError", r"mistakes\.py.*\d+")),
    # -- heads (stages.train.heads.H) --
    Case("head-one-class-too-many", head("oops_extra_class_head"), "stages.train.heads.classification", "oops_extra_class_head",
         (r"4 classes|\(\s*\w+\s*,\s*4\s*\)", r"\(\s*\d+\s*,\s*5\s*\)")),
    Case("head-float64-output", head("oops_double_head"), "stages.train.heads.classification", "oops_double_head",
         (r"float32", r"float64")),
    Case("head-returns-list", head("oops_list_head"), "stages.train.heads.classification", "oops_list_head",
         (r"tensor", r"list")),
    Case("segmentation-head-half-resolution", head("oops_half_resolution_head", "segmentation"), "stages.train.heads.segmentation",
         "oops_half_resolution_head", (r"\b32\b", r"\b16\b")),
    Case("head-loss-is-a-float", head("oops_float_loss_head"), "stages.train.heads.classification", "oops_float_loss_head",
         (r"tensor", r"loss")),
    Case("head-nan-loss", head("oops_nan_loss_head"), "stages.train.heads.classification", "oops_nan_loss_head",
         (r"\bnan\b",), code=1),
    Case("head-factory-near-miss-num_class", head("oops_near_miss_head"), "stages.train.heads.classification", "oops_near_miss_head",
         (r"num_classes", r"num_class\b")),
    # -- evaluators (stages.test.evaluators[i]) --
    Case("evaluator-compute-returns-float", evaluate_with("oops_float_evaluator"), "stages.test.evaluators[0]", "oops_float_evaluator",
         (r"mapping|dict", r"float")),
    Case("evaluator-compute-returns-string", evaluate_with("oops_string_evaluator"), "stages.test.evaluators[0]", "oops_string_evaluator",
         (r"mapping|dict", r"str")),
    Case("evaluator-metric-not-a-number", evaluate_with("oops_non_number_evaluator"), "stages.test.evaluators[0]",
         "oops_non_number_evaluator", (r"number", r"str"), extra=("oops/acc",)),
    Case("evaluator-nan-without-reason", evaluate_with("oops_nan_evaluator"), "stages.test.evaluators[0]", "oops_nan_evaluator",
         (r"\bnan\b", r"reason|why|undefined"), extra=("oops/score",)),
    Case("evaluator-metric-name-collision", evaluate_with("classification", "oops_colliding_evaluator"), "stages.test.evaluators[1]",
         "oops_colliding_evaluator", (r"stages\.test\.evaluators\[0\]|'classification'",), extra=("macro_f1",)),
    Case("evaluator-update-key-error", evaluate_with("oops_key_error_evaluator"), "stages.test.evaluators[0]", "oops_key_error_evaluator",
         (r"KeyError", r"'labels'")),
    Case("evaluator-intervals-not-pairs", evaluate_with("oops_pairless_intervals_evaluator"), "stages.test.evaluators[0]",
         "oops_pairless_intervals_evaluator", (r"low.*high|pair|two numbers",), extra=("oops/acc",)),
    Case("select-metric-nan-at-every-validation",
         chain(setting("stages.train.evaluators", ["oops_nan_select_evaluator"]), setting("stages.train.select", "oops/auc")),
         "stages.train.select", "oops_nan_select_evaluator", (r"\bnan\b", r"every|all|no epoch|none of"), code=1, extra=("oops/auc",)),
    # -- augmentations (stages.train.augment) --
    Case("augment-drops-label", augment("oops_drop_label_augment"), "stages.train.augment", "oops_drop_label_augment",
         (r"'?label'?",)),
    Case("augment-float64-images", augment("oops_float64_augment"), "stages.train.augment", "oops_float64_augment",
         (r"float32", r"float64")),
    Case("augment-crops-image-not-mask", augment("oops_crop_image_only_augment"), "stages.train.augment", "oops_crop_image_only_augment",
         (r"mask", r"\b24\b")),
    Case("augment-moves-to-other-device", augment("oops_other_device_augment"), "stages.train.augment", "oops_other_device_augment",
         (r"device", r"\bcpu\b", r"\bmeta\b")),
    Case("augment-intensities-out-of-range", augment("oops_brighten_augment"), "stages.train.augment", "oops_brighten_augment",
         (r"\[0, 1\]",)),
    Case("augment-returns-none", augment("oops_no_return_augment"), "stages.train.augment", "oops_no_return_augment",
         (r"dict|mapping|batch", r"None")),
    # -- data sources (data) --
    Case("data-one-based-labels", data("oops_one_based_data"), "data", "oops_one_based_data", (r"label", r"\b4\b")),
    Case("data-items-without-has_mask", data("oops_no_has_mask_data"), "data", "oops_no_has_mask_data", (r"has_mask",)),
    Case("data-uint8-images", data("oops_uint8_data"), "data", "oops_uint8_data", (r"float", r"uint8")),
    Case("data-image-without-channel", data("oops_channel_less_data"), "data", "oops_channel_less_data",
         (r"\(\s*C\s*,\s*H\s*,\s*W\s*\)|channel",)),
    Case("data-describe-returns-list", data("oops_list_describe_data"), "data", "oops_list_describe_data",
         (r"describe", r"dict|mapping", r"list")),
    # -- encoders (model.encoder) --
    Case("encoder-declared-strides-wrong", setting("model.encoder", "oops_wrong_strides_encoder"), "model.encoder",
         "oops_wrong_strides_encoder", (r"stride",)),
    Case("encoder-factory-value-error", setting("model.encoder", {"name": "oops_width_encoder", "width": 0}), "model.encoder",
         "oops_width_encoder", (), extra=("width must be at least 1",)),
    # -- optimizers, schedules, loggers --
    Case("optimizer-factory-takes-params", setting("optimizer", {"name": "oops_params_optimizer", "lr": 0.01}), "optimizer",
         "oops_params_optimizer", (r"param_groups",)),
    Case("schedule-step-needs-an-argument", setting("schedule", {"name": "oops_plateau_schedule"}), "schedule",
         "oops_plateau_schedule", (r"step\(\)|step",)),
    Case("logger-log_metrics-raises", setting("loggers", ["oops_refusing_logger"]), "loggers[0]", "oops_refusing_logger",
         (r"log_metrics", r"ConnectionError|refused")),
]


def invoke(*args: Any) -> tuple[int | None, str, str]:
    """``corex ARGS`` in-process; an exception that escapes the command line comes back as code None
    with its traceback in stderr (what a user would have seen)."""
    from corex.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: int | None = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        except Exception:
            code = None
            err.write("".join(traceback.format_exc()))
    return code, out.getvalue(), err.getvalue()


def names(key: str) -> re.Pattern[str]:
    """``key`` as a whole recipe key, or one of its options (``optimizer.params``), not the start of a longer name."""
    return re.compile(r"(?<![\w.\[])" + re.escape(key) + r"(?![\w\[])")


def check_message(code: int | None, err: str, *, expected_code: int, key: str, component: str, expected: tuple[str, ...],
                  extra: tuple[str, ...] = ()) -> None:
    shown = err[-3000:]
    problems = []
    if code != expected_code:
        problems.append(f"exit code {code}, expected {expected_code}")
    if "Traceback" in err:
        problems.append("a Python traceback")
    if not names(key).search(err):
        problems.append(f"no recipe key {key!r}")
    if component not in err:
        problems.append(f"no component name {component!r}")
    if PLUGIN not in err:
        problems.append(f"no plugin name {PLUGIN!r}")
    problems += [f"nothing matching /{pattern}/" for pattern in expected if not re.search(pattern, err, re.IGNORECASE)]
    problems += [f"no {text!r}" for text in extra if text not in err]
    assert not problems, "; ".join(problems) + f"\n--- stderr ---\n{shown}"


@pytest.fixture
def oops(corex_plugin):
    return corex_plugin(mistakes, name=PLUGIN)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_plugin_mistake_is_one_message_naming_the_culprit(case: Case, oops, tmp_path):
    recipe = base_recipe(tmp_path)
    case.edit(recipe)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(recipe), sort_keys=False))
    code, _, err = invoke("--progress", "off", "run", path, "--out", tmp_path / "run")
    check_message(code, err, expected_code=case.code, key=case.key, component=case.component, expected=case.expected, extra=case.extra)


def test_the_base_recipe_runs(oops, tmp_path):
    """The cases differ from this recipe by one mistake each; it must itself run."""
    recipe = base_recipe(tmp_path)
    recipe["stages"]["test"] = {"kind": "evaluate", "split": "test", "evaluators": ["classification"]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = invoke("--progress", "off", "run", path, "--out", tmp_path / "run")
    assert code == 0, err[-3000:]


BROKEN_PLUGIN = '''\
"""A plugin whose import fails: a typo in an import."""
from corex import hookimpl
from torch.nn import Conv2D  # torch spells it Conv2d


@hookimpl
def corex_encoders():
    return {}
'''


def test_a_plugin_that_fails_to_import_is_named_with_its_file_and_line(tmp_path):
    (tmp_path / "oops_broken_plugin.py").write_text(BROKEN_PLUGIN)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**base_recipe(tmp_path), "data": {"name": "phantom", "image_size": 32}}))
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "COREX_PLUGINS": "oops_broken_plugin", "PYTHONPATH": path, "COREX_PROGRESS": "off"}
    done = subprocess.run([sys.executable, "-m", "corex", "run", str(recipe), "--out", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=120)
    err = done.stderr
    problems = []
    if done.returncode != 2:
        problems.append(f"exit code {done.returncode}")
    if "Traceback" in err:
        problems.append("a traceback")
    for wanted in ("oops_broken_plugin", "COREX_PLUGINS", "Conv2D", "line 3"):
        if wanted not in err:
            problems.append(f"no {wanted!r}")
    assert not problems, "; ".join(problems) + f"\n{err[-3000:]}"
    assert not (tmp_path / "run").exists(), "a plugin that cannot load must stop corex before it makes the run directory"
