"""`corex predict` and the Python API on real and broken files, studies, TTA and saliency."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from corex_cxr.cache import decode_to_cache
from corex_cxr.dicom import write_dicom
from corex_predict import TTAModel, load_model, parse_tta, predict
from corex_predict.export import export_model
from corex_predict.tta import HorizontalFlip, Shrink
from PIL import Image
from pydicom.data import get_testdata_file
from torch import nn

import corex
from corex.cli import main
from corex.errors import CorexError

PROBS = ["prob_negative", "prob_typical", "prob_indeterminate", "prob_atypical"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny toy run (one epoch) and its export, shared by the module."""
    from corex.plugins import get_plugin_manager, register, reset_plugin_manager
    from corex.testing import ToyPlugin, tiny_recipe_dict

    reset_plugin_manager()
    register(get_plugin_manager(), ToyPlugin, name="corex-toy")
    recipe = tiny_recipe_dict()
    recipe["stages"]["train"]["epochs"] = 1
    recipe["stages"]["test"]["evaluators"] = [{"name": "classification", "bootstrap": 0}]
    root = tmp_path_factory.mktemp("predict")
    corex.run(recipe, root / "run", progress=False)
    export_model(root / "run", root / "model.pt")
    reset_plugin_manager()
    return root


def cli(*args) -> int:
    return main([str(a) for a in args])


def _png(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_the_real_radiograph_and_its_jpeg2000_twin_get_the_same_probabilities(exported, tmp_path, capsys):
    uncompressed, jpeg2000 = get_testdata_file("RG1_UNCR.dcm"), get_testdata_file("RG1_J2KR.dcm")
    code = cli("predict", exported / "model.pt", uncompressed, jpeg2000, "--out", tmp_path, "--no-progress")
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((tmp_path / "predictions.json").read_text())
    images = [r for r in result["records"] if r["level"] == "image"]
    assert [Path(r["file"]).name for r in images] == ["RG1_UNCR.dcm", "RG1_J2KR.dcm"]
    assert [images[0][k] for k in PROBS] == [images[1][k] for k in PROBS]  # lossless JPEG 2000: identical
    assert sum(images[0][k] for k in PROBS) == pytest.approx(1.0, abs=1e-6)
    # Both files carry one StudyInstanceUID: one study of two images.
    (study,) = [r for r in result["records"] if r["level"] == "study"]
    assert study["n_images"] == 2 and study["study_id"] == images[0]["study_id"]
    assert 0.0 <= images[0]["opacity_fraction"] <= 1.0 and result["skipped"] == []
    assert "RG1_UNCR.dcm" in out  # the summary table


def test_predict_feeds_the_model_the_tensor_the_training_cache_holds(exported):
    """MONOCHROME1, 15 bits, window 15000/30000: the decoded image is the cache's, to the bit."""
    model = load_model(exported / "model.pt")
    path = get_testdata_file("RG1_UNCR.dcm")
    pixels, _ = decode_to_cache(Path(path), model.image_size)
    expected = torch.from_numpy(pixels.astype(np.float32) / 65535.0)[None, None]
    with torch.no_grad():
        reference = torch.softmax(model.model(expected.to(memory_format=torch.channels_last))["classification"], 1)[0]
    (record, _) = predict(model, [path])
    assert [record[k] for k in PROBS] == pytest.approx(reference.tolist(), abs=1e-6)


def test_a_folder_with_broken_files_predicts_the_good_ones_and_lists_the_bad(exported, tmp_path, capsys):
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    _png(folder / "a.png", 0)
    _png(folder / "sub" / "b.png", 1)
    write_dicom(folder / "good.dcm", np.random.default_rng(2).integers(0, 4096, (64, 64), dtype=np.uint16), bits_stored=12, study_uid="1.2.3")
    write_dicom(folder / "cut.dcm", np.random.default_rng(3).integers(0, 4096, (64, 64), dtype=np.uint16), bits_stored=12)
    data = (folder / "cut.dcm").read_bytes()
    (folder / "cut.dcm").write_bytes(data[: len(data) // 2])  # truncated in the pixel data
    (folder / "notes.dcm").write_text("not an image, only named like one\n")
    (folder / "README.txt").write_text("ignored: not an image suffix\n")

    code = cli("predict", exported / "model.pt", folder, "--out", tmp_path / "out", "--no-progress", "--batch-size", "2")
    _, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err
    result = json.loads((tmp_path / "out" / "predictions.json").read_text())
    skipped = {Path(s["file"]).name: s["reason"] for s in result["skipped"]}
    assert set(skipped) == {"cut.dcm", "notes.dcm"}
    assert "not a DICOM file" in skipped["notes.dcm"] and skipped["cut.dcm"]
    for name, reason in skipped.items():
        assert f"{name}: {reason}" in err
    images = [r for r in result["records"] if r["level"] == "image"]
    assert sorted(Path(r["file"]).name for r in images) == ["a.png", "b.png", "good.dcm"]
    for record in images:
        assert sum(record[k] for k in PROBS) == pytest.approx(1.0, abs=1e-6)
        assert record["predicted"] == max(PROBS, key=record.get)[len("prob_"):]
    with (tmp_path / "out" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result["records"]) == 6  # three images, three studies (each picture its own)
    assert {r["level"] for r in rows} == {"image", "study"}


def test_usage_errors_exit_2_with_a_message(exported, tmp_path, capsys):
    image = _png(tmp_path / "a.png", 0)
    assert cli("predict", tmp_path / "missing.pt", image, "--out", tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_text("a text file, not a model")
    assert cli("predict", tmp_path / "junk.pt", image, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "junk.pt" in err and "not a torch file" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert cli("predict", exported / "model.pt", tmp_path / "empty", "--out", tmp_path / "o") == 2
    assert "no image files" in capsys.readouterr().err
    assert cli("predict", exported / "model.pt", image, "--out", tmp_path / "o", "--tta", "vflip") == 2
    err = capsys.readouterr().err
    assert "unknown view 'vflip'" in err and "Traceback" not in err


def test_study_csv_groups_images_and_averages_their_probabilities(exported, tmp_path):
    a, b, c = (_png(tmp_path / f"{n}.png", i) for i, n in enumerate("abc"))
    (tmp_path / "studies.csv").write_text("Path,Study_ID\na.png,s1\nb.png,s1\nc.png,s2\n")
    predictions = predict(load_model(exported / "run"), [a, b, c], study_csv=tmp_path / "studies.csv", batch_size=2)
    images = {Path(r["file"]).name: r for r in predictions.images}
    studies = {r["study_id"]: r for r in predictions.studies}
    assert set(studies) == {"s1", "s2"} and studies["s1"]["n_images"] == 2
    expected = np.mean([[images[n][k] for k in PROBS] for n in ("a.png", "b.png")], axis=0)
    assert [studies["s1"][k] for k in PROBS] == pytest.approx(expected.tolist(), abs=1e-6)
    assert studies["s1"]["opacity_fraction"] == pytest.approx((images["a.png"]["opacity_fraction"] + images["b.png"]["opacity_fraction"]) / 2)
    assert [studies["s2"][k] for k in PROBS] == pytest.approx([images["c.png"][k] for k in PROBS], abs=1e-7)


def test_the_python_api_in_three_lines_from_a_run_or_an_export(exported, tmp_path):
    image = _png(tmp_path / "a.png", 5)
    from_run = predict(load_model(exported / "run"), [image])
    from_file = predict(load_model(exported / "model.pt"), [image])
    assert isinstance(from_run, list) and all(isinstance(r, dict) for r in from_run)
    assert [r["level"] for r in from_run] == ["image", "study"]
    assert from_run == from_file and from_run.skipped == []


def test_saliency_writes_readable_overlays(exported, tmp_path, capsys):
    image = _png(tmp_path / "chest.png", 7)
    code = cli("predict", exported / "model.pt", image, get_testdata_file("RG1_UNCR.dcm"), "--out", tmp_path / "o", "--saliency", "--no-progress")
    assert code == 0, capsys.readouterr().err
    records = json.loads((tmp_path / "o" / "predictions.json").read_text())["records"]
    overlays = [Path(r["saliency"]) for r in records if r["level"] == "image"]
    assert [p.name for p in overlays] == ["00000-chest.png", "00001-RG1_UNCR.png"]
    for path in overlays:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.width > 400  # two panels with colour bars


class _Probe(nn.Module):
    """Encoder: the image itself; classification: logits from the left and right halves;
    segmentation: 3 x image. Small enough to compute TTA by hand."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Identity()
        cls, seg = nn.Module(), nn.Module()
        cls.task, seg.task = "classification", "segmentation"
        self.heads = nn.ModuleDict({"classification": cls, "segmentation": seg})

    def forward(self, image, heads=None):
        half = image.shape[-1] // 2
        left, right = image[..., :half].mean((1, 2, 3)), image[..., half:].mean((1, 2, 3))
        return {"classification": torch.stack([4 * left, 4 * right, left - right], 1), "segmentation": 3 * image}


def test_tta_averages_probabilities_over_views_and_maps_masks_back():
    model, image = _Probe(), torch.rand(2, 1, 16, 16)
    outputs = TTAModel(model, [HorizontalFlip()])(image)
    plain, flipped = model(image)["classification"], model(image.flip(-1))["classification"]
    expected = (torch.softmax(plain, 1) + torch.softmax(flipped, 1)) / 2
    assert torch.allclose(torch.softmax(outputs["classification"], 1), expected, atol=1e-6)
    # The flipped view's mask is flipped back, so the average is the unflipped mask.
    assert torch.allclose(torch.sigmoid(outputs["segmentation"]), torch.sigmoid(3 * image), atol=1e-5)
    shrink = Shrink(0.5)
    constant = torch.ones(1, 1, 16, 16)
    assert torch.allclose(shrink.invert(shrink.apply(constant)), constant)  # every pixel maps back
    assert shrink.apply(constant)[..., 0, :].abs().sum() == 0  # an air border, as resize_pad pads
    assert [v.name for v in parse_tta("hflip, scale=0.8")] == ["hflip", "scale=0.8"]
    with pytest.raises(CorexError, match="scale factor"):
        parse_tta("scale=2")


def test_tta_on_real_files_changes_probabilities_but_keeps_them_distributions(exported, tmp_path):
    image = _png(tmp_path / "a.png", 3)
    model = load_model(exported / "model.pt")
    plain, augmented = predict(model, [image]), predict(model, [image], tta="hflip,scale")
    assert augmented.info["tta"] == ["hflip", "scale"]
    assert sum(augmented[0][k] for k in PROBS) == pytest.approx(1.0, abs=1e-6)
    assert [plain[0][k] for k in PROBS] != [augmented[0][k] for k in PROBS]


def test_a_copied_run_directory_checkpoint_loads_as_the_run(exported, tmp_path):
    shutil.copytree(exported / "run", tmp_path / "run")
    best = load_model(tmp_path / "run" / "checkpoints" / "train" / "best.pt")
    assert best.meta["stage"] == "train" and best.class_names[0] == "negative"


# -- loading the plugin (tests/core/test_plugins.py checks that it imports nothing heavy) -----------


def test_the_public_functions_stay_functions_once_their_modules_are_imported():
    import corex_predict
    import corex_predict.evaluation
    import corex_predict.prediction

    assert corex_predict.predict is corex_predict.prediction.predict
    assert corex_predict.evaluate is corex_predict.evaluation.evaluate
    assert callable(corex_predict.load_model) and corex_predict.TTAModel is TTAModel



# -- files, names and the input gate's header checks ----------------------------------------------------


def test_out_naming_a_file_is_a_usage_error_before_any_work(exported, tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("someone's notes\n")
    image = _png(tmp_path / "a.png", 0)
    # The model does not even exist: the --out mistake is reported first, and nothing is read or written.
    assert cli("predict", tmp_path / "no-such-model.pt", image, "--out", taken) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a file" in err and "does not exist" not in err and "Traceback" not in err
    assert taken.read_text() == "someone's notes\n"


def test_file_names_that_are_not_utf8_are_predicted_and_written_safely(exported, tmp_path, capsys):
    import os

    folder = tmp_path / "scans"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/scan\xff.png"  # not valid UTF-8
    _png(Path(os.fsdecode(raw)), 4)
    _png(folder / "plain.png", 5)
    code = cli("predict", exported / "model.pt", folder, "--out", tmp_path / "out", "--no-progress")
    out, err = capsys.readouterr()
    assert code == 0, err
    document = json.loads((tmp_path / "out" / "predictions.json").read_bytes().decode("utf-8"))
    names = [Path(r["file"]).name for r in document["records"] if r["level"] == "image"]
    assert names == ["plain.png", "scan\\xff.png"]  # the byte shown as an escape, in both files
    text = (tmp_path / "out" / "predictions.csv").read_bytes().decode("utf-8")
    assert "scan\\xff.png" in text and len(list(csv.DictReader(text.splitlines()))) == 4
    assert "scan\\xff.png" in out


def test_header_checks_flag_other_modalities_and_views_and_pass_the_chest(exported, tmp_path, capsys):
    import pydicom

    lateral = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    lateral.ViewPosition = "LL"
    lateral.save_as(tmp_path / "lateral.dcm")
    inputs = [get_testdata_file("RG1_UNCR.dcm"), get_testdata_file("MR_small.dcm"), tmp_path / "lateral.dcm", _png(tmp_path / "a.png", 1)]
    code = cli("predict", exported / "model.pt", *inputs, "--out", tmp_path / "out", "--no-progress")
    err = capsys.readouterr().err
    assert code == 0, err
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    flags = [r["flags"] for r in records["records"] if r["level"] == "image"]
    assert flags == ["", "modality=MR", "view=LL", ""]  # this model carries no fitted gate: header checks only
    assert records["gate"] == {"mode": "warn", "header_checks": True}
    assert "header checks only" in err and "flagged 2" in err
    code = cli("predict", exported / "model.pt", *inputs, "--out", tmp_path / "strict", "--gate", "strict", "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "modality=MR" in err and "view=LL" in err
    kept = json.loads((tmp_path / "strict" / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in kept["records"] if r["level"] == "image"] == ["RG1_UNCR.dcm", "a.png"]
    assert cli("predict", exported / "model.pt", *inputs, "--out", tmp_path / "off", "--gate", "off", "--no-progress") == 0
    capsys.readouterr()
    assert all(r["flags"] == "" for r in json.loads((tmp_path / "off" / "predictions.json").read_text())["records"])
