"""corex_track: the ``tensorboard`` and ``mlflow`` loggers, read back with TensorBoard's event reader
and MLflow's client, through a tiny run, an interrupted and resumed one, and bad options."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

import corex
import corex_track
from corex import Component
from corex.errors import CorexError, RecipeError
from corex.plugins import Registry
from corex.testing import assert_light, assert_mirrors, tiny_recipe_dict
from corex_track import MlflowLogger, TensorBoardLogger, mlflow_key

STEPS = 3  # optimisation steps per epoch in these runs


@pytest.fixture
def track(corex_pm, corex_plugin, monkeypatch):
    """The loggers registered (an installed corex_track already is), MLflow kept offline and quiet."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # the logger sets it for its file store; unset again afterwards
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    if "tensorboard" not in Registry(corex_pm).components("loggers"):
        corex_plugin(corex_track, name="track")
    return corex_pm


def tracked_recipe(tmp_path: Path, epochs: int = 2, **mlflow_options) -> dict:
    recipe = tiny_recipe_dict()
    recipe["data"]["cache_dir"] = str(tmp_path / "cache")
    recipe["stages"]["train"]["epochs"] = epochs
    recipe["stages"]["train"]["max_steps_per_epoch"] = STEPS
    recipe["loggers"] = [{"name": "tensorboard"}, {"name": "mlflow", **mlflow_options}]
    return recipe


def run(recipe: dict, out: Path, **kwargs) -> dict:
    return corex.run(corex.load_recipe(recipe), out=out, progress=False, **kwargs)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as TensorBoard shows them (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_client(out: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(out / "mlruns").as_uri())


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_id(out: Path) -> str:
    return json.loads((out / "loggers.json").read_text())["loggers[1]"]["run_id"]


@pytest.mark.slow
def test_a_run_writes_tensorboard_events_and_an_mlflow_run_that_their_readers_read_back(track, tmp_path):
    out = tmp_path / "run"
    results = run(tracked_recipe(tmp_path), out)
    test = results["stages"]["test"]
    epochs = rows(out)
    assert [r["steps"] for r in epochs] == [STEPS, STEPS]

    # TensorBoard: every epoch's numbers at the step count, the test metrics and their intervals at the last step.
    board = scalars(out / "tensorboard")
    assert board["train/val/macro_f1"] == [(STEPS * (i + 1), pytest.approx(r["val/macro_f1"])) for i, r in enumerate(epochs)]
    assert board["train/train/loss"] == [(STEPS * (i + 1), pytest.approx(r["train/loss"])) for i, r in enumerate(epochs)]
    assert [step for step, _ in board["train/lr"]] == [STEPS, 2 * STEPS]
    low, high = test["intervals"]["macro_f1"]
    assert board["test/macro_f1"] == [(2 * STEPS, pytest.approx(test["metrics"]["macro_f1"]))]
    assert board["test/macro_f1/low"] == [(2 * STEPS, pytest.approx(low))]
    assert board["test/macro_f1/high"] == [(2 * STEPS, pytest.approx(high))]
    assert board["test/f1/typical"] == [(2 * STEPS, pytest.approx(test["metrics"]["f1/typical"]))]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"recipe/text_summary", "artifacts/report.md/text_summary", "artifacts/results.json/text_summary"} <= set(events.Tags()["tensors"])
    assert "artifacts/curves.png" in events.Tags()["images"]

    # MLflow: the recipe as parameters, the metrics' history, the test figures, the files, a finished run.
    client = mlflow_client(out)
    experiment = client.get_experiment_by_name("tiny")  # the recipe's name
    assert experiment is not None
    mlrun = client.get_run(run_id(out))
    assert mlrun.info.experiment_id == experiment.experiment_id
    assert mlrun.info.status == "FINISHED"
    assert mlrun.info.run_name == "run"  # the run directory's name
    params = mlrun.data.params
    assert params["name"] == "tiny"
    assert params["stages.train.epochs"] == "2"
    assert params["stages.train.max_steps_per_epoch"] == str(STEPS)
    assert params["optimizer.lr"] == "0.003"
    assert "classification" in params["stages.test.evaluators"]  # a list stays one value
    history = client.get_metric_history(mlrun.info.run_id, "train/val.macro_f1")
    assert [(m.step, m.value) for m in history] == [(STEPS * (i + 1), pytest.approx(r["val/macro_f1"])) for i, r in enumerate(epochs)]
    metrics = mlrun.data.metrics
    assert metrics["test/macro_f1"] == pytest.approx(test["metrics"]["macro_f1"])
    assert (metrics["test/macro_f1.low"], metrics["test/macro_f1.high"]) == (pytest.approx(low), pytest.approx(high))
    assert metrics["test/auroc.negative"] == pytest.approx(test["metrics"]["auroc/negative"])  # beside test/auroc
    assert metrics["train/train.loss.classification"] == pytest.approx(epochs[-1]["train/loss/classification"])
    assert metrics["test/dice"] == pytest.approx(test["metrics"]["dice"])
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"results.json", "report.html", "report.md", "recipe.yaml", "curves.png"} <= artifacts
    kept = Path(client.download_artifacts(mlrun.info.run_id, "results.json", str(tmp_path / "dl")))
    assert json.loads(kept.read_text()) == json.loads((out / "results.json").read_text())


class StopAfterFirstEpoch:
    """Interrupts the run like Ctrl-C once epoch 1 of ``train`` is saved (and logged: the loggers'
    observer is registered later, so pluggy calls it first)."""

    @staticmethod
    @corex.hookimpl
    def corex_epoch_end(stage, epoch):
        if stage == "train" and epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tensorboard_folder_and_mlflow_run_without_repeating_a_step(track, corex_plugin, tmp_path):
    recipe, out = tracked_recipe(tmp_path, epochs=3), tmp_path / "run"
    corex_plugin(StopAfterFirstEpoch, name="stopper")
    with pytest.raises(KeyboardInterrupt):
        run(recipe, out)
    track.unregister(name="stopper")
    first = run_id(out)
    client = mlflow_client(out)
    assert client.get_run(first).info.status == "KILLED"
    assert [s for s, _ in scalars(out / "tensorboard")["train/val/macro_f1"]] == [STEPS]

    results = run(recipe, out, resume=True)

    assert run_id(out) == first
    experiment = client.get_experiment_by_name("tiny")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [first]  # no second MLflow run
    mlrun = client.get_run(first)
    assert mlrun.info.status == "FINISHED"
    epochs = rows(out)
    expected = [(STEPS * (i + 1), pytest.approx(r["val/macro_f1"])) for i, r in enumerate(epochs)]
    assert len(expected) == 3
    assert [(m.step, m.value) for m in client.get_metric_history(first, "train/val.macro_f1")] == expected
    assert mlrun.data.metrics["test/macro_f1"] == pytest.approx(results["stages"]["test"]["metrics"]["macro_f1"])

    assert [p.name for p in out.iterdir() if "tensorboard" in p.name] == ["tensorboard"]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one folder, a file per session
    board = scalars(out / "tensorboard")
    assert board["train/val/macro_f1"] == expected
    assert board["test/macro_f1"] == [(3 * STEPS, pytest.approx(results["stages"]["test"]["metrics"]["macro_f1"]))]
    assert all(len({s for s, _ in points}) == len(points) for points in board.values())


def build(registry: Registry, name: str, run_dir: Path, **options):
    return corex.build_component(registry, "loggers", Component(name, options), "loggers[0]", run_dir=run_dir)


def test_bad_options_are_recipe_problems_at_the_loggers_path(track, tmp_path):
    registry = Registry(track)
    with pytest.raises(RecipeError, match=r"loggers\[0\]: .*unknown scheme 'fiel'"):
        build(registry, "mlflow", tmp_path, tracking_uri="fiel:/tmp/mlruns")
    with pytest.raises(RecipeError, match=r"loggers\[0\]: .*names no host"):
        build(registry, "mlflow", tmp_path, tracking_uri="http://")
    with pytest.raises(RecipeError, match=r"loggers\[0\]: .*experiment is empty"):
        build(registry, "mlflow", tmp_path, experiment=" ")
    with pytest.raises(RecipeError, match=r"loggers\[0\]: .*'bad:key' is not a valid MLflow tag name"):
        build(registry, "mlflow", tmp_path, tags={"bad:key": "x"})
    recipe = tiny_recipe_dict()
    recipe["loggers"] = [{"name": "tensorboard", "logdir": "tb"}, {"name": "mlflow", "tracking_uri": 5}]
    with pytest.raises(RecipeError) as problems:
        corex.load_recipe(recipe)
    text = str(problems.value)
    assert "loggers[0].logdir: unknown option; did you mean 'log_dir'?" in text
    assert "loggers[1].tracking_uri" in text
    # A log_dir that is a file is named when the run starts.
    (tmp_path / "taken").write_text("")
    with pytest.raises(CorexError, match="'.*taken' is a file, not a folder"):
        build(registry, "tensorboard", tmp_path, log_dir=Path("taken")).start({}, resumed=False)


@pytest.mark.slow
def test_a_bad_tracking_uri_stops_corex_run_before_training_with_exit_code_2(track, corex_cli, tmp_path):
    recipe = tracked_recipe(tmp_path, tracking_uri="mlflow.example.org:5000")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = corex_cli("run", str(path), "--out", str(tmp_path / "run"))
    assert code == 2, err
    assert "loggers[1]" in err and "unknown scheme 'mlflow.example.org'" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_missing_package_names_what_to_install(track, tmp_path, monkeypatch):
    registry = Registry(track)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(CorexError, match=r"'mlflow' logger needs the mlflow .*pip install \"corex-cxr\[tracking\]\""):
        build(registry, "mlflow", tmp_path)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(CorexError, match=r"'tensorboard' logger needs the tensorboard package.*pip install \"corex-cxr\[tracking\]\""):
        build(registry, "tensorboard", tmp_path)


def test_a_database_uri_without_sqlalchemy_asks_for_the_full_mlflow(track, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # as mlflow-skinny alone leaves it: not importable
    with pytest.raises(CorexError, match=r"database, which needs the full MLflow .*pip install mlflow"):
        build(Registry(track), "mlflow", tmp_path, tracking_uri="sqlite:///mlflow.db")


def test_mlflow_keys_and_long_values_fit_mlflow_and_a_changed_value_becomes_a_tag(track, tmp_path):
    assert mlflow_key("stages.test.evaluators[0].name") == "stages.test.evaluators.0.name"
    assert mlflow_key("heads/a:b (c)/x") == "heads.a_b _c_.x"
    assert mlflow_key("test/auroc/negative", group=True) == "test/auroc.negative"
    assert mlflow_key("/x/", group=True) == "x."
    assert mlflow_key("..", group=True) == "__"
    assert mlflow_key("/") == "_"
    assert len(mlflow_key("k" * 400)) == 250
    long = "v" * 10_000
    params = {"name": "keys", "stages.test.evaluators[0].name": "classification", "a:b": 1, "a_b": 2, "note": long,
              "flag": True, "none": None}
    logger = MlflowLogger(run_dir=tmp_path / "r", tags={"site": "A"})
    logger.start(params, resumed=False)
    logger.log_metrics("train", 5, {"val/f1 (typical)": 0.5, "lr": 1e-3})
    logger.close()
    client = mlflow_client(tmp_path / "r")
    held = client.get_run(logger.run_id)
    assert held.data.tags["site"] == "A"
    assert held.data.params["stages.test.evaluators.0.name"] == "classification"
    assert (held.data.params["a_b"], held.data.params["a_b_2"]) == ("1", "2")  # two keys that clean to one stay apart
    assert (held.data.params["flag"], held.data.params["none"]) == ("true", "null")
    assert held.data.params["note"].endswith("...") and len(held.data.params["note"]) <= 6000
    assert held.data.metrics["train/val.f1 _typical_"] == 0.5

    again = MlflowLogger(run_dir=tmp_path / "r", tags={"site": "A"})
    again.load_state_dict(logger.state_dict())
    again.start({**params, "note": "changed", "new": 3}, resumed=True)
    again.close()
    held = client.get_run(logger.run_id)
    assert again.run_id == logger.run_id
    assert held.data.params["new"] == "3"
    assert held.data.params["note"].startswith("vvv") and held.data.tags["resumed/note"] == "changed"
    # A run missing from the store (mlruns deleted) is replaced by a new one, with a message.
    lost = MlflowLogger(run_dir=tmp_path / "r")
    lost.load_state_dict({"run_id": "0123456789abcdef0123456789abcdef"})
    lost.start(params, resumed=True)
    lost.close()
    assert lost.run_id != "0123456789abcdef0123456789abcdef"


def test_tensorboard_hides_the_steps_a_resumed_run_writes_again(tmp_path):
    """A stage redone after a resume (an extended run) writes its steps again: TensorBoard shows the new ones only."""
    first = TensorBoardLogger(run_dir=tmp_path)
    first.start({"name": "x"}, resumed=False)
    for step in (3, 6, 9):
        first.log_metrics("train", step, {"train/loss": float(step)})
    first.log_results("test", {"metrics": {"macro_f1": 0.5}, "intervals": {"macro_f1": [0.4, 0.6]}})
    first.close()
    again = TensorBoardLogger(run_dir=tmp_path)
    again.load_state_dict(first.state_dict())
    again.start({"name": "x"}, resumed=True)
    for step in (6, 9):
        again.log_metrics("train", step, {"train/loss": -float(step)})
    again.close()
    board = scalars(tmp_path / "tensorboard")
    assert board["train/train/loss"] == [(3, 3.0), (6, -6.0), (9, -9.0)]
    assert board["test/macro_f1/low"] == []  # written at step 9 before: gone until the redone test stage writes it
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_tracking_uris_and_folders(tmp_path):
    from corex_track.tracker import parse_tracking_uri

    assert parse_tracking_uri(None, tmp_path) == ((tmp_path / "mlruns").absolute().as_uri(), (tmp_path / "mlruns").absolute())
    assert parse_tracking_uri("../shared", tmp_path)[1] == (tmp_path / ".." / "shared").absolute()
    assert parse_tracking_uri(f"file:{tmp_path}/x y", tmp_path)[1] == tmp_path / "x y"
    assert parse_tracking_uri(f"file://{tmp_path}/z", tmp_path)[0] == (tmp_path / "z").as_uri()
    assert parse_tracking_uri("https://mlflow.example.org", tmp_path) == ("https://mlflow.example.org", None)
    assert parse_tracking_uri("databricks", tmp_path) == ("databricks", None)
    with pytest.raises(ValueError, match="not on host"):
        parse_tracking_uri("file://server/mlruns", tmp_path)
    logger = TensorBoardLogger(run_dir=tmp_path)
    assert logger.log_dir == (tmp_path / "tensorboard").absolute()
    assert TensorBoardLogger(run_dir=tmp_path, log_dir=Path("/elsewhere/tb")).log_dir == Path("/elsewhere/tb")
    logger.load_state_dict({"log_dir": str(tmp_path / "gone")})  # the saved folder is gone: keep the configured one
    assert logger.log_dir == (tmp_path / "tensorboard").absolute()


def test_the_package_is_light_and_its_factories_mirror_the_loggers():
    assert_light("corex_track")
    assert_mirrors(corex_track.tensorboard_logger, TensorBoardLogger)
    assert_mirrors(corex_track.mlflow_logger, MlflowLogger)
