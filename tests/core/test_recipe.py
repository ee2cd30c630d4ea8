"""Recipe loading: every malformed recipe gets a precise message with its path, all at once."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import corex
from corex.errors import RecipeError
from corex.recipe import apply_overrides, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def problems_of(recipe: dict, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, overrides)
    return info.value.problems


def with_change(base: dict, change) -> dict:
    recipe = copy.deepcopy(base)
    change(recipe)
    return recipe


MALFORMED = [
    # (what is wrong, edit of the tiny recipe, the expected message)
    ("misspelled top-level key", lambda r: r.update(seeds=1), "seeds: unknown key; did you mean 'seed'?"),
    ("misspelled stage key", lambda r: r["stages"]["train"].update(epoch=3), "stages.train.epoch: unknown key; did you mean 'epochs'?"),
    ("head weight not a number", lambda r: r["stages"]["train"]["heads"]["segmentation"].update(weight="high"),
     "stages.train.heads.segmentation.weight: expected a number, got 'high'"),
    ("unknown encoder", lambda r: r["model"].update(encoder="resnet05"),
     "model.encoder: encoder 'resnet05' is not registered; did you mean 'resnet50'?"),
    ("encoder option of the wrong type", lambda r: r["model"]["encoder"].update(width="wide"),
     "model.encoder.width: expected an integer, got 'wide'"),
    ("unknown encoder option", lambda r: r["model"]["encoder"].update(depth=3), "model.encoder.depth: unknown option. Options: in_channels, width, weights"),
    ("optimizer not offered", lambda r: r["optimizer"].update(name="adamm"),
     "optimizer.name: optimizer 'adamm' is not registered; did you mean 'adam'?"),
    ("stage without kind", lambda r: r["stages"]["train"].pop("kind"), "stages.train.kind: is required"),
    ("stage kind misspelled", lambda r: r["stages"]["train"].update(kind="trian"),
     "stages.train.kind: expected one of 'train', 'pretrain', 'evaluate', got 'trian'; did you mean 'train'?"),
    ("train stage without heads", lambda r: r["stages"]["train"].pop("heads"), "stages.train.heads: a train stage needs at least one head"),
    ("pretrain stage without objective", lambda r: r["stages"]["train"].update(kind="pretrain", heads={}),
     "stages.train.objective: a pretrain stage needs an objective"),
    ("encoder from a stage that does not exist", lambda r: r["stages"]["test"].update(encoder_from="trian"),
     "stages.test.encoder_from: 'trian' is neither an earlier stage (train) nor an existing file; did you mean 'train'?"),
    ("image size not a multiple of 32", lambda r: r["data"].update(image_size=100), "data.image_size: must be a multiple of 32"),
    ("label fraction out of range", lambda r: r["data"].update(label_fraction=1.5), "data.label_fraction: must be in (0, 1], got 1.5"),
    ("unknown dataset option", lambda r: r["data"].update(studeis=10), "data.studeis: unknown option; did you mean 'studies'?"),
    ("unknown dataset", lambda r: r["data"].update(name="siim2"), "data.name: dataset 'siim2' is not registered; did you mean 'siim'?"),
    ("evaluator reading a head nobody defines", lambda r: r["stages"]["test"]["evaluators"].append({"name": "classification", "head": "cls"}),
     "stages.test.evaluators[2].head: no stage up to this one defines a head 'cls'"),
    ("option the core supplies", lambda r: r["stages"]["train"]["heads"]["classification"].update(num_classes=5),
     "stages.train.heads.classification.num_classes: is supplied by corex and cannot be set in a recipe"),
    ("component without a name", lambda r: r["stages"]["train"].update(augment={"hflip": True}),
     "stages.train.augment: a component needs a 'name'"),
    ("stages not a mapping", lambda r: r.update(stages=["train"]), "stages: expected a mapping of stage name to stage"),
    ("missing model", lambda r: r.pop("model"), "model: is required"),
    ("epochs of zero", lambda r: r["stages"]["train"].update(epochs=0), "stages.train.epochs: must be at least 1, got 0"),
    ("a bool where a number belongs", lambda r: r["optimizer"].update(lr=True), "optimizer.lr: expected a number, got True"),
    ("selection without evaluators", lambda r: r["stages"]["train"].pop("evaluators"),
     "stages.train.select.metric: selecting on 'macro_f1' needs evaluators"),
    ("a head redefined with other options", lambda r: r["stages"].update(
        more={"kind": "train", "heads": {"classification": {"dropout": 0.5}}}),
     "stages.more.heads.classification: stage 'train' already defines head 'classification' with other options"),
]


@pytest.mark.parametrize("what, change, expected", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_gets_a_precise_message(tiny_recipe, what, change, expected):
    problems = problems_of(with_change(tiny_recipe, change))
    assert any(expected in p for p in problems), f"{what}: {problems}"


# (what, override, the expected problem): values of the right type that make no sense.
OUT_OF_RANGE = [
    ("negative learning rate", "optimizer.lr=-0.1", "optimizer.lr: must be greater than 0, got -0.1"),
    ("zero learning rate", "optimizer.lr=0", "optimizer.lr: must be greater than 0, got 0"),
    ("NaN learning rate", "optimizer.lr=.nan", "optimizer.lr: must be a finite number, got nan"),
    ("NaN learning rate as text", "optimizer.lr=nan", "optimizer.lr: must be a finite number, got nan"),
    ("infinite learning rate of a stage", "stages.train.optimizer={lr: .inf}", "stages.train.optimizer.lr: must be a finite number, got inf"),
    ("betas above 1", "optimizer.betas=[0.5, 2]", "optimizer.betas[1]: must be in [0, 1), got 2"),
    ("beta of exactly 1", "optimizer.betas=[0.9, 1]", "optimizer.betas[1]: must be in [0, 1), got 1"),
    ("negative beta", "optimizer.betas=[-0.1, 0.9]", "optimizer.betas[0]: must be in [0, 1), got -0.1"),
    ("momentum of 1", "optimizer.momentum=1", "optimizer.momentum: must be in [0, 1), got 1"),
    ("negative weight decay", "optimizer.weight_decay=-1", "optimizer.weight_decay: must be at least 0, got -1"),
    ("negative warmup", "schedule.warmup_epochs=-2", "schedule.warmup_epochs: must be at least 0, got -2"),
    ("min_lr_ratio above 1", "schedule.min_lr_ratio=5", "schedule.min_lr_ratio: must be in [0, 1], got 5"),
    ("negative min_lr_ratio", "schedule.min_lr_ratio=-0.5", "schedule.min_lr_ratio: must be in [0, 1], got -0.5"),
    ("stage batch size of 0", "stages.train.batch_size=0", "stages.train.batch_size: must be at least 1, got 0"),
    ("negative stage batch size", "stages.train.batch_size=-3", "stages.train.batch_size: must be at least 1, got -3"),
    ("data batch size of 0", "data.batch_size=0", "data.batch_size: must be at least 1, got 0"),
    ("negative loader workers", "data.num_workers=-1", "data.num_workers: must be at least 0, got -1"),
    ("a million loader workers", "data.num_workers=1000000", "data.num_workers: must be at most 1024, got 1000000 (each worker is a process)"),
    ("batch size as a huge float", "data.batch_size=1.0e+300", "data.batch_size: must be at most 1048576, got 1"),
    ("negative seed", "seed=-1", "seed: must be in [0, 9223372036854775807], got -1"),
    ("seed as a huge float", "seed=1.0e+23", "seed: must be in [0, 9223372036854775807], got 99999999999999991611392"),
    ("seed of 2**63", f"seed={2**63}", "seed: must be in [0, 9223372036854775807], got 9223372036854775808"),
    ("device tpu", "device=tpu", "device: expected auto, cpu, cuda, cuda:N (a GPU index) or mps, got 'tpu'"),
    ("device cuda:x", "device=cuda:x", "device: expected auto, cpu, cuda, cuda:N"),
    ("negative grad_clip", "stages.train.grad_clip=-1", "stages.train.grad_clip: must be greater than 0, got -1"),
    ("zero grad_clip", "stages.train.grad_clip=0", "stages.train.grad_clip: must be greater than 0, got 0"),
    ("zero steps per epoch", "stages.train.max_steps_per_epoch=0", "stages.train.max_steps_per_epoch: must be at least 1, got 0"),
    ("absurd epochs", "stages.train.epochs=1.0e+12", "stages.train.epochs: must be at most 100000, got 1000000000000 (more than 100,000 epochs is surely a typo)"),
    ("negative epochs", "stages.train.epochs=-1", "stages.train.epochs: must be at least 1, got -1"),
    ("huge image", "data.image_size=65536", "data.image_size: must be at most 4096, got 65536 (a larger side would not fit in memory"),
    ("tiny image", "data.image_size=0", "data.image_size: must be at least 32, got 0 (the encoders' deepest stride)"),
    ("label fraction of 0", "data.label_fraction=0", "data.label_fraction: must be in (0, 1], got 0"),
    ("negative head weight", "stages.train.heads.classification.weight=-1", "stages.train.heads.classification.weight: must be at least 0, got -1"),
    ("NaN head weight", "stages.train.heads.segmentation.weight=.nan", "stages.train.heads.segmentation.weight: must be a finite number, got nan"),
]


@pytest.mark.parametrize("what, override, expected", OUT_OF_RANGE, ids=[r[0] for r in OUT_OF_RANGE])
def test_a_value_out_of_its_range_is_a_problem_at_its_path(tiny_recipe, what, override, expected):
    problems = problems_of(tiny_recipe, [override])
    # A value given with --set is named as such, so the user knows it is not in the recipe file.
    assert len(problems) == 1 and problems[0].startswith("--set " + expected), f"{what}: {problems}"


@pytest.mark.parametrize("override", [
    "device=cuda:1", "device=mps", "device=cpu", "seed=9223372036854775807", "seed=0", "stages.train.grad_clip=null",
    "stages.train.batch_size=null", "stages.train.epochs=100000", "data.image_size=4096", "optimizer.betas=[0, 0.999]",
    "schedule.min_lr_ratio=1", "schedule.warmup_epochs=0", "optimizer.weight_decay=0", "stages.train.heads.segmentation.weight=0",
])
def test_values_at_the_edges_of_their_ranges_are_accepted(tiny_recipe, override):
    key, text = override.split("=", 1)
    resolved = load_recipe(tiny_recipe, [override]).resolved(Path("/cache"))
    node = resolved
    for part in key.split("."):
        node = node[part]
    # The value read is the value given (a stage's null batch size inherits data.batch_size, 8).
    expected = 8 if override == "stages.train.batch_size=null" else yaml.safe_load(text)
    assert node == expected and isinstance(node, str) == isinstance(expected, str), (override, node)
    if key.startswith(("optimizer.", "schedule.")):  # the top-level block is what the train stage uses
        stage_node = resolved["stages"]["train"][key.split(".")[0]][key.split(".")[1]]
        assert stage_node == expected, (override, stage_node)


def test_a_stage_without_batch_size_inherits_the_data_batch_size(tiny_recipe):
    recipe = load_recipe(tiny_recipe, ["stages.test.batch_size=2"])
    assert recipe.stage_batch_size(recipe.stages["train"]) == 8
    assert recipe.stage_batch_size(recipe.stages["test"]) == 2


def test_every_problem_is_reported_at_once(tiny_recipe):
    def many(r):
        r.update(seeds=1)
        r["model"]["encoder"].update(width="wide")
        r["stages"]["train"]["heads"]["segmentation"].update(weight="high")
        r["data"].update(image_size=100)
        r["optimizer"].update(lr=-1)
        r["stages"]["train"].update(evaluators=[], select="macro_f1")
    # Value ranges are checked as each value is read; cross-checks between values (selection
    # needs evaluators) wait for a well-typed recipe.
    problems = problems_of(with_change(tiny_recipe, many))
    assert sorted(p.split(":")[0] for p in problems) == [
        "data.image_size", "model.encoder.width", "optimizer.lr", "seeds", "stages.train.heads.segmentation.weight",
    ]


def test_the_error_message_counts_and_indents_problems(tiny_recipe):
    recipe = with_change(tiny_recipe, lambda r: r.update(seeds=1, devise="cpu"))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert str(info.value).startswith("2 problems:\n  seeds: unknown key")


def test_numbers_written_as_yaml_strings_are_read_as_numbers(tiny_recipe):
    tiny_recipe["optimizer"]["lr"] = "1e-3"  # YAML 1.1 reads 1e-3 (no dot) as a string
    assert load_recipe(tiny_recipe).optimizer.lr == pytest.approx(0.001)


def test_overrides_address_stages_by_name_and_parse_yaml_values(tiny_recipe):
    tiny_recipe["model"]["encoder"] = "resnet18"
    recipe = load_recipe(tiny_recipe, [
        "stages.train.epochs=5", "model.encoder.width=4", "stages.test.evaluators.0.bootstrap=7",
        "optimizer.betas=[0.8, 0.9]", "data.label_fraction=0.5",
    ])
    assert recipe.stages["train"].epochs == 5
    assert recipe.model.encoder.name == "resnet18" and recipe.model.encoder.options["width"] == 4
    assert recipe.stages["test"].evaluators[0].options["bootstrap"] == 7
    assert recipe.optimizer.betas == (0.8, 0.9)
    assert recipe.data.label_fraction == 0.5


def test_overrides_of_missing_paths_are_errors_with_suggestions(tiny_recipe):
    problems = problems_of(tiny_recipe, ["stages.trian.epochs=3", "epochs3"])
    assert "--set stages.trian.epochs: there is no 'trian' under stages; did you mean 'train'?" in problems
    assert any(p.startswith("--set 'epochs3': expected KEY=VALUE") for p in problems)


def test_an_override_value_is_validated_like_the_file(tiny_recipe):
    assert problems_of(tiny_recipe, ["stages.train.epochs=many"]) == ["--set stages.train.epochs: expected an integer, got 'many'"]


def test_resolved_recipe_round_trips(tiny_recipe):
    recipe = load_recipe(tiny_recipe)
    again = load_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    assert again.digest() == recipe.digest()
    assert again.stages["train"].heads["segmentation"].weight == 0.5
    assert again.stages["train"].select.metric == "macro_f1"


def test_yaml_syntax_errors_name_line_and_column(tmp_path, corex_pm):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstages:\n  train: {kind: train\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "broken.yaml" in str(info.value) and "line " in str(info.value)


def test_a_top_level_list_is_rejected(tmp_path, corex_pm):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "the top level must be a mapping" in str(pytest.raises(RecipeError, load_recipe, path).value)


def test_apply_overrides_turns_a_bare_component_into_a_mapping():
    data = {"stages": {"train": {"augment": "cxr_light"}}}
    assert apply_overrides(data, ["stages.train.augment.hflip=true"]) == []
    assert data["stages"]["train"]["augment"] == {"name": "cxr_light", "hflip": True}


SHIPPED = sorted(RECIPES.rglob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.relative_to(RECIPES).as_posix() for p in SHIPPED}
    assert {"quickstart.yaml", "classification.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(RECIPES).as_posix() for p in SHIPPED])
def test_every_shipped_recipe_validates_and_says_how_to_run_it(path, tmp_path, corex_pm):
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("# ") and len(first) > 20, "a recipe opens with a comment saying what it does"
    assert "corex run" in text, "a recipe's header gives the command that runs it"
    overrides = [f"data.root={tmp_path}"] if "siim" in path.parts else []
    if "external" in path.name:  # the pre-training corpus, a folder of its own
        overrides.append(f"stages.pretrain.data.root={tmp_path}")
    recipe = corex.load_recipe(path, overrides)
    assert recipe.stages
