"""The phantom: rendering, the SIIM layout it writes, determinism, atomicity and its CLI."""

from __future__ import annotations

import argparse
import ast
import csv
import importlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian

from corex_cxr.cli import corex_cli
from corex_cxr.phantom import CLASS_COLUMNS, render_study, write_siim_phantom

# The package's `phantom` attribute is the dataset factory, which shadows the module.
phantom = importlib.import_module("corex_cxr.phantom")

SEED, SIZE, STUDIES = 3, 64, 12


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "siim"
    return write_siim_phantom(out, studies=STUDIES, seed=SEED, size=SIZE, progress=False)


@pytest.fixture(scope="module")
def dicoms(written) -> list[tuple[Path, pydicom.Dataset]]:
    return [(path, pydicom.dcmread(path)) for path in sorted(written.glob("train/*/*/*.dcm"))]


# -- the layout ------------------------------------------------------------------------------------


def test_study_csv_is_one_hot_in_the_competition_columns(written):
    header, rows = read_csv(written / "train_study_level.csv")
    assert header == ["id", *CLASS_COLUMNS]
    assert len(rows) == STUDIES
    for row in rows:
        assert row["id"].endswith("_study")
        assert sorted(row[c] for c in CLASS_COLUMNS) == ["0", "0", "0", "1"]
    # Every class appears, typical (the largest, as in the real data) most often.
    counts = Counter(next(c for c in CLASS_COLUMNS if row[c] == "1") for row in rows)
    assert set(counts) == set(CLASS_COLUMNS)
    assert counts.most_common(1)[0][0] == "Typical Appearance"


def test_every_image_row_has_its_dicom_at_study_series_sop(written, dicoms):
    header, rows = read_csv(written / "train_image_level.csv")
    assert header == ["id", "boxes", "label", "StudyInstanceUID"]
    _, studies = read_csv(written / "train_study_level.csv")
    study_uids = {row["id"].removesuffix("_study") for row in studies}
    by_sop = {path.stem: (path, ds) for path, ds in dicoms}
    assert len(rows) == len(dicoms) >= STUDIES
    assert {row["StudyInstanceUID"] for row in rows} == study_uids
    for row in rows:
        assert row["id"].endswith("_image")
        path, ds = by_sop[row["id"].removesuffix("_image")]
        assert path.parent.parent.name == ds.StudyInstanceUID == row["StudyInstanceUID"]
        assert path.parent.name == ds.SeriesInstanceUID
        assert path.stem == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert path.relative_to(written).parts[0] == "train"


def test_dicoms_are_valid_uncompressed_radiographs(dicoms):
    for _, ds in dicoms:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
            assert UID(uid).is_valid
        assert ds.Modality in {"DX", "CR"}
        assert ds.BitsAllocated == 16 and ds.BitsStored in {12, 16} and ds.HighBit == ds.BitsStored - 1
        pixels = ds.pixel_array
        assert pixels.shape == (SIZE, SIZE) and pixels.dtype == np.uint16
        assert pixels.max() < 2**ds.BitsStored and pixels.std() > 0
        if "WindowWidth" in ds:  # the window spans the stored values after the rescale
            slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
            low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
            assert low <= slope * pixels.min() + intercept
    assert {ds.PhotometricInterpretation for _, ds in dicoms} == {"MONOCHROME1", "MONOCHROME2"}


def test_like_the_real_data_some_studies_have_several_images_and_some_patients_several_studies(dicoms):
    images_per_study = Counter(ds.StudyInstanceUID for _, ds in dicoms)
    assert max(images_per_study.values()) >= 2
    studies_per_patient = Counter(pid for pid, _ in {(ds.PatientID, ds.StudyInstanceUID) for _, ds in dicoms})
    assert sorted(studies_per_patient.values())[-1] == 2
    # Same patient, same sex.
    sexes = {(ds.PatientID, ds.PatientSex) for _, ds in dicoms}
    assert len(sexes) == len(studies_per_patient)


def test_boxes_and_labels_columns(written):
    _, studies = read_csv(written / "train_study_level.csv")
    negative = {r["id"].removesuffix("_study") for r in studies if r["Negative for Pneumonia"] == "1"}
    _, rows = read_csv(written / "train_image_level.csv")
    boxed = 0
    for row in rows:
        if not row["boxes"]:
            assert row["label"] == "none 1 0 0 1 1"
            continue
        assert row["StudyInstanceUID"] not in negative
        boxes = ast.literal_eval(row["boxes"])
        tokens = row["label"].split()
        assert len(tokens) == 6 * len(boxes) >= 6
        for i, box in enumerate(boxes):
            assert set(box) == {"x", "y", "width", "height"}
            name, confidence, x0, y0, x1, y1 = tokens[6 * i : 6 * i + 6]
            assert (name, confidence) == ("opacity", "1")
            assert float(x0) == pytest.approx(box["x"]) and float(y0) == pytest.approx(box["y"])
            assert float(x1) == pytest.approx(box["x"] + box["width"], abs=2e-3)
            assert float(y1) == pytest.approx(box["y"] + box["height"], abs=2e-3)
            assert 0 <= box["x"] < box["x"] + box["width"] <= SIZE
            assert 0 <= box["y"] < box["y"] + box["height"] <= SIZE
        boxed += 1
    assert boxed >= STUDIES // 2
    assert negative and all(
        not row["boxes"] for row in rows if row["StudyInstanceUID"] in negative
    )


def test_stored_pixels_are_the_rendered_image_and_monochrome1_is_inverted(written, dicoms):
    """Image k of study j is render_study(default_rng((seed, j, k)), ...) as the docstring says."""
    _, studies = read_csv(written / "train_study_level.csv")
    for path, ds in dicoms:
        j = next(i for i, row in enumerate(studies) if row["id"] == f"{ds.StudyInstanceUID}_study")
        label = next(i for i, c in enumerate(CLASS_COLUMNS) if studies[j][c] == "1")  # no label noise
        rendered, _ = render_study(np.random.default_rng((SEED, j, ds.InstanceNumber - 1)), label, SIZE, 0.5)
        correlation = np.corrcoef(ds.pixel_array.ravel().astype(float), rendered.ravel())[0, 1]
        expected = -1.0 if ds.PhotometricInterpretation == "MONOCHROME1" else 1.0
        assert correlation == pytest.approx(expected, abs=1e-3), path


# -- determinism and atomicity ---------------------------------------------------------------------


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first = files_of(write_siim_phantom(tmp_path / "a", studies=5, seed=7, size=SIZE, progress=False))
    again = files_of(write_siim_phantom(tmp_path / "b", studies=5, seed=7, size=SIZE, progress=False))
    other = files_of(write_siim_phantom(tmp_path / "c", studies=5, seed=8, size=SIZE, progress=False))
    assert first == again
    assert first["train_study_level.csv"] != other["train_study_level.csv"]
    assert not set(first) & set(other) - {"train_study_level.csv", "train_image_level.csv", "phantom.json"}


def test_write_is_atomic(tmp_path, monkeypatch):
    out = write_siim_phantom(tmp_path / "done", studies=2, size=SIZE, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]  # no temporary sibling left
    with pytest.raises(FileExistsError, match="done"):
        write_siim_phantom(out, studies=2, size=SIZE, progress=False)

    real_dicom, written = phantom._dicom, []

    def fail_on_third_image(*args):
        written.append(args)
        if len(written) == 3:
            raise RuntimeError("disk full")
        return real_dicom(*args)

    monkeypatch.setattr(phantom, "_dicom", fail_on_third_image)
    with pytest.raises(RuntimeError, match="disk full"):
        write_siim_phantom(tmp_path / "broken", studies=6, size=SIZE, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]


def test_label_noise_relabels_that_fraction_and_records_the_truth(tmp_path):
    out = write_siim_phantom(
        tmp_path / "noisy", studies=10, seed=1, size=SIZE, label_noise=0.5, progress=False
    )
    _, studies = read_csv(out / "train_study_level.csv")
    label_of = {row["id"]: next(c for c in CLASS_COLUMNS if row[c] == "1") for row in studies}
    relabelled = json.loads((out / "phantom.json").read_text())["relabelled"]
    assert len(relabelled) == 5
    for study_id, truth in relabelled.items():
        assert label_of[study_id] != truth
    # A study labelled negative has no boxes, whatever its image shows.
    _, images = read_csv(out / "train_image_level.csv")
    for row in images:
        if label_of[f"{row['StudyInstanceUID']}_study"] == "Negative for Pneumonia":
            assert row["boxes"] == "" and row["label"] == "none 1 0 0 1 1"


def test_class_balance_and_argument_errors(tmp_path):
    out = write_siim_phantom(
        tmp_path / "neg", studies=4, size=SIZE, class_balance=(1, 0, 0, 0), progress=False
    )
    _, rows = read_csv(out / "train_image_level.csv")
    assert all(row["label"] == "none 1 0 0 1 1" for row in rows)
    with pytest.raises(ValueError, match="class_balance"):
        write_siim_phantom(tmp_path / "x", studies=4, class_balance=(1, 1, 1))
    with pytest.raises(ValueError, match="difficulty must be between 0 and 1, got 1.5"):
        write_siim_phantom(tmp_path / "x", studies=4, difficulty=1.5)
    with pytest.raises(ValueError, match="studies"):
        write_siim_phantom(tmp_path / "x", studies=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        write_siim_phantom(tmp_path / "x", studies=2, seed=-1)
    with pytest.raises(ValueError, match="label 4"):
        render_study(np.random.default_rng(0), 4)
    assert not (tmp_path / "x").exists()


# -- the images ------------------------------------------------------------------------------------


def added_opacity(seed: int, label: int, size: int, difficulty: float):
    """The same patient with and without the class's findings (render_study's contract)."""
    with_finding, boxes = render_study(np.random.default_rng(seed), label, size, difficulty)
    without, no_boxes = render_study(np.random.default_rng(seed), 0, size, difficulty)
    assert no_boxes == []
    return with_finding - without, boxes


def inside(boxes, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    for x, y, w, h in boxes:
        mask[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
    return mask


@pytest.mark.parametrize("label", [1, 2, 3])
def test_boxes_cover_the_added_opacity(label):
    for seed in range(6):
        added, boxes = added_opacity(seed, label, 128, 0.3)
        assert boxes, (seed, label)
        for x, y, w, h in boxes:
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
            assert added[inside([(x, y, w, h)], 128)].max() > 0.04  # each box holds a finding
        bright = added > 0.5 * added.max()
        assert bright[inside(boxes, 128)].sum() >= 0.97 * bright.sum(), (seed, label)


def test_typical_is_bilateral_and_indeterminate_unilateral_when_easy():
    for seed in range(6):
        _, typical = added_opacity(seed, 1, 128, 0.0)
        _, indeterminate = added_opacity(seed, 2, 128, 0.0)
        assert len(typical) == 2 and {x + w / 2 < 64 for x, _, w, _ in typical} == {True, False}
        assert len(indeterminate) == 1


def test_lungs_are_darker_than_the_mediastinum():
    for seed in range(6):
        image, _ = render_study(np.random.default_rng(seed), 0, 128, 1.0)
        right_lung = image[50:60, 31:41].mean()  # image left
        left_lung = image[50:60, 87:97].mean()
        mediastinum = image[40:50, 60:68].mean()
        outside = image[5:15, 0:6].mean()  # air beside the neck
        assert max(right_lung, left_lung) + 0.1 < mediastinum
        assert outside < min(right_lung, left_lung)


def test_difficulty_makes_findings_fainter():
    def mean_contrast(difficulty: float) -> float:
        return float(np.mean([
            added[inside(boxes, 96)].mean()
            for seed in range(4) for label in (1, 2, 3)
            for added, boxes in [added_opacity(seed, label, 96, difficulty)]
        ]))

    assert mean_contrast(0.0) > 1.8 * mean_contrast(1.0) > 0


def test_render_range_and_determinism():
    image, boxes = render_study(np.random.default_rng(11), 1, 64, 0.5)
    again, boxes_again = render_study(np.random.default_rng(11), 1, 64, 0.5)
    assert image.dtype == np.float32 and image.shape == (64, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.1
    np.testing.assert_array_equal(image, again)
    assert boxes == boxes_again


# -- command line ----------------------------------------------------------------------------------


def test_cli_writes_a_data_set(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="corex data")
    corex_cli(data_commands=parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(
        ["phantom", str(out), "--studies", "3", "--size", "64", "--seed", "2", "--label-noise", "0"]
    )
    assert args.handler(args) == 0
    assert "3 studies" in capsys.readouterr().out
    _, rows = read_csv(out / "train_study_level.csv")
    assert len(rows) == 3 and len(list(out.glob("train/*/*/*.dcm"))) >= 3

    args = parser.parse_args(["phantom", str(tmp_path / "bad"), "--studies", "3", "--difficulty", "2"])
    assert args.handler(args) == 2
    assert "difficulty must be between 0 and 1, got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
