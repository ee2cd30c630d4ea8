"""The study's arms end to end (shrunk), transfer of the right encoder, and resume of pre-training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import corex
from corex.plugins import register

ROOT = Path(__file__).resolve().parents[2]
ARMS = sorted((ROOT / "recipes" / "phantom").glob("*.yaml"))


def shrunk(path: Path, cache: Path, extra: tuple[str, ...] = ()) -> list[str]:
    overrides = [
        "data.studies=80", "data.image_size=64", "data.batch_size=16", f"data.cache_dir={cache}",
        "model.encoder.width=8", "stages.finetune.epochs=1", "stages.test.evaluators.0.bootstrap=20",
    ]
    if "pretrain:" in path.read_text():
        overrides += ["stages.pretrain.epochs=1"]
    return overrides + list(extra)


@pytest.mark.parametrize("path", ARMS, ids=[p.stem for p in ARMS])
def test_every_phantom_arm_runs_end_to_end(path, tmp_path, corex_pm):
    recipe = corex.load_recipe(path, shrunk(path, tmp_path / "cache"))
    results = corex.run(recipe, out=tmp_path / "run", progress=False)
    assert set(results["stages"]) == set(recipe.stages)
    test = results["stages"]["test"]["metrics"]
    assert 0.0 <= test["macro_f1"] <= 1.0 and test["n"] > 0
    if "pretrain" in recipe.stages:
        pre = results["stages"]["pretrain"]
        assert pre["kind"] == "pretrain" and torch.isfinite(torch.tensor(pre["metrics"]["loss"]))
    if "inpaint" in path.stem:
        assert (tmp_path / "run" / "pretrain" / "inpaint_epoch001.png").exists()


def test_the_transferred_encoder_is_the_moco_query_encoder(tmp_path, corex_pm):
    path = ROOT / "recipes" / "phantom" / "moco_classification.yaml"
    recipe = corex.load_recipe(path, shrunk(path, tmp_path / "cache", ("stages.pretrain.epochs=2",)))
    corex.run(recipe, out=tmp_path / "run", progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    pre = torch.load(checkpoints / "pretrain" / "last.pt", weights_only=True)
    query = {k[len("encoder."):]: v for k, v in pre["objective"].items() if k.startswith("encoder.")}
    key = {k[len("key_encoder."):]: v for k, v in pre["objective"].items() if k.startswith("key_encoder.")}
    assert query and key.keys() == query.keys()
    assert any(not torch.equal(query[k], key[k]) for k in query if "weight" in k)  # they differ after training
    transferred = torch.load(checkpoints / "pretrain" / "model.pt", weights_only=True)["model"]
    for name, value in query.items():
        assert torch.equal(transferred[f"encoder.{name}"], value), name


class StopPretrainAfterEpoch1:
    @staticmethod
    @corex.hookimpl
    def corex_epoch_end(stage, epoch):
        if stage == "pretrain" and epoch == 1:
            raise KeyboardInterrupt


def test_moco_queue_and_pointer_survive_resume(tmp_path, corex_pm):
    path = ROOT / "recipes" / "phantom" / "moco_classification.yaml"
    overrides = shrunk(path, tmp_path / "cache", ("stages.pretrain.epochs=2", "stages.pretrain.objective.queue_size=64"))
    recipe = corex.load_recipe(path, overrides)
    straight = corex.run(recipe, out=tmp_path / "a", progress=False)

    register(corex_pm, StopPretrainAfterEpoch1, name="stopper")
    with pytest.raises(KeyboardInterrupt):
        corex.run(recipe, out=tmp_path / "b", progress=False)
    saved = torch.load(tmp_path / "b" / "checkpoints" / "pretrain" / "last.pt", weights_only=True)["objective"]
    corex_pm.unregister(name="stopper")
    resumed = corex.run(recipe, out=tmp_path / "b", resume=True, progress=False)

    # The queue after epoch 1 was checkpointed: 64 keys, the pointer where epoch 1 left it, i.e. past
    # every key of the epoch's images, wrapped around the queue (a non-zero place with these sizes).
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    seen = next(r["images"] for r in rows if r["stage"] == "pretrain" and r["epoch"] == 1)
    assert saved["queue"].shape[1] == 64 and seen % 64 != 0, seen
    assert int(saved["queue_ptr"]) == seen % 64, (seen, saved["queue_ptr"])
    final_a = torch.load(tmp_path / "a" / "checkpoints" / "pretrain" / "last.pt", weights_only=True)["objective"]
    final_b = torch.load(tmp_path / "b" / "checkpoints" / "pretrain" / "last.pt", weights_only=True)["objective"]
    assert torch.equal(final_a["queue"], final_b["queue"]) and torch.equal(final_a["queue_ptr"], final_b["queue_ptr"])
    for stage in ("pretrain", "finetune", "test"):
        assert resumed["stages"][stage]["metrics"] == straight["stages"][stage]["metrics"], stage
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("pretrain", 1), ("pretrain", 2), ("finetune", 1)]


def test_label_fraction_trains_on_fewer_studies_and_pretraining_sees_all(tmp_path, corex_pm):
    path = ROOT / "recipes" / "phantom" / "moco_classification.yaml"
    recipe = corex.load_recipe(path, shrunk(path, tmp_path / "cache", ("data.label_fraction=0.25",)))
    corex.run(recipe, out=tmp_path / "run", progress=False)
    source = corex.build_data(recipe)
    assert len(source.split("train", label_fraction=0.25)) < len(source.split("train"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # images seen per epoch: pre-training uses every training image, fine-tuning a quarter
    seen = {r["stage"]: r["images_per_s"] * r["train_time_s"] for r in rows}
    assert seen["finetune"] < 0.5 * seen["pretrain"]
