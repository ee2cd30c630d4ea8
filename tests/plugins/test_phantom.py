"""The phantom: rendering, the SIIM layout it writes, determinism, atomicity and its CLI."""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import importlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian

from corex_cxr.cli import corex_cli
from corex_cxr.dicom import read_dicom
from corex_cxr.metadata import from_header
from corex_cxr.phantom import CLASS_COLUMNS, MANUFACTURERS, phantom_siim_source, render_study, write_siim_phantom

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
    # Same patient, same sex and age.
    sexes = {(ds.PatientID, ds.PatientSex, ds.PatientAge) for _, ds in dicoms}
    assert len(sexes) == len(studies_per_patient)


def test_headers_for_subgroup_analysis(dicoms):
    for _, ds in dicoms:
        assert ds.PatientSex in {"F", "M"} and ds.ViewPosition in {"AP", "PA"} and ds.BodyPartExamined == "CHEST"
        assert len(ds.PatientAge) == 4 and ds.PatientAge.endswith("Y") and 20 <= int(ds.PatientAge[:3]) <= 90
        assert ds.Manufacturer in MANUFACTURERS[ds.Modality]
        portable = "PORTABLE" in ds.SeriesDescription
        assert ds.SeriesDescription == f"CHEST {ds.ViewPosition}" + (" PORTABLE" if portable else "")
        assert not portable or ds.ViewPosition == "AP"
        meta = from_header(ds)
        assert meta.portable == ("yes" if portable else "no") and meta.age_band and meta.view == ds.ViewPosition


def test_header_proportions_are_realistic():
    plan = phantom._plan(2000, 0, 0.0, phantom._check_balance(None))
    headers = phantom._headers(plan, 0)
    patients = {study.patient: headers[study.images[0].uid] for study in plan}
    male = np.mean([h.sex == "M" for h in patients.values()])
    ages = np.array([h.age for h in patients.values()])
    assert 0.52 < male < 0.58 and ages.min() >= 20 and ages.max() <= 90 and 50 < ages.mean() < 70
    views = [h.view for h in headers.values()]
    assert 0.52 < views.count("AP") / len(views) < 0.58
    assert 0.75 < np.mean([h.portable for h in headers.values() if h.view == "AP"]) < 0.85
    assert not any(h.portable for h in headers.values() if h.view == "PA")
    for study in plan:  # one sex and age per patient, across studies
        assert {(headers[i.uid].sex, headers[i.uid].age) for i in study.images} == {(patients[study.patient].sex,
                                                                                     patients[study.patient].age)}


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


# -- the headers move no pixel: hashes of the data before they existed --------------------------------


def digest(value) -> str:
    return hashlib.sha256(value if isinstance(value, bytes) else json.dumps(value).encode()).hexdigest()[:16]


def pixel_digest(root: Path) -> str:
    """The stored pixels and every element that maps them to intensities, per file."""
    per_file = {}
    for path in sorted(root.glob("train/*/*/*.dcm")):
        ds = pydicom.dcmread(path)
        keys = [str(ds.get(k, "")) for k in ("PhotometricInterpretation", "BitsStored", "RescaleSlope",
                                             "RescaleIntercept", "WindowCenter", "WindowWidth", "Rows", "Columns")]
        per_file[path.stem] = digest(ds.PixelData + json.dumps(keys).encode())
    return hashlib.sha256(json.dumps(per_file, sort_keys=True).encode()).hexdigest()[:16]


def test_default_phantom_is_bit_identical_to_before_the_headers(written):
    assert pixel_digest(written) == "120752ecef45c486"
    assert digest((written / "train_study_level.csv").read_bytes()) == "92e580fa720230f7"
    assert digest((written / "train_image_level.csv").read_bytes()) == "17ed757c2fef2a01"


def test_quickstart_plan_and_renders_are_unchanged():
    """Everything but the pixels of the quickstart's 1,500 studies, and a few of its renders."""
    expected = {(1500, 0, 0.0): "3e337703c18fbe68", (400, 0, 0.0): "a4eba59ab22e9533", (200, 5, 0.3): "1cfb2e1152f2271b"}
    for (studies, seed, noise), value in expected.items():
        plan = phantom._plan(studies, seed, noise, phantom._check_balance(None))
        rows = [[s.uid, s.truth, s.label, s.patient, [[i.index, i.uid, i.series_uid, i.series_number, i.boxed, i.modality,
                 i.monochrome1, i.bits, list(i.stored_range), list(i.rescale) if i.rescale else None, i.window]
                 for i in s.images]] for s in plan]
        assert digest(rows) == value
    renders = {(0, 0, 0, 1, 256, 0.3): "bd8d8b2873a7f731", (0, 7, 0, 3, 256, 0.3): "d41173d2269ef0ff",
               (0, 11, 1, 0, 256, 0.3): "a4fbe9eb340a983a", (3, 2, 0, 2, 64, 0.5): "eb4d6dc861b706e0"}
    for (seed, j, k, label, size, difficulty), value in renders.items():
        image, boxes = render_study(np.random.default_rng((seed, j, k)), label, size, difficulty)
        assert digest(image.tobytes() + json.dumps(boxes).encode()) == value


def items_digest(data) -> dict:
    found = {}
    for split in ("train", "val", "test"):
        h, items = hashlib.sha256(), data.split(split)
        for item in items:
            fields = [item["image_id"], item["study_id"], item["patient_id"], int(item["label"]), bool(item["has_mask"])]
            h.update(json.dumps(fields).encode())
            h.update(item["image"].numpy().tobytes())
            h.update(item["mask"].numpy().tobytes())
        found[split] = [len(items), h.hexdigest()[:16]]
    subset = data.split("train", label_fraction=0.3)
    found["train@0.3"] = digest(sorted(item["image_id"] for item in subset))
    return found


def test_phantom_source_items_splits_and_order_are_unchanged(tmp_path):
    data = phantom_siim_source(image_size=32, seed=0, cache_dir=tmp_path, studies=30, difficulty=0.3, workers=1)
    assert items_digest(data) == {"train": [24, "94ea7804aa044bf7"], "val": [4, "c00c648514202c60"],
                                  "test": [4, "71c5bcaae3f8bbf9"], "train@0.3": "ba24ad3798434eb5"}
    data = phantom_siim_source(image_size=32, seed=1, cache_dir=tmp_path, studies=24, folds=3, fold=1, workers=1)
    assert items_digest(data) == {"train": [16, "06f3ce5175b979df"], "val": [6, "78480ed5c47f9b5e"],
                                  "test": [3, "878b3e7b4c7597e3"], "train@0.3": "81e685df9e28a558"}


# -- the planted harder subgroup -------------------------------------------------------------------


def noise_and_contrast(image: np.ndarray) -> tuple[float, float]:
    """(median absolute Laplacian, a robust noise level; 5th-95th percentile spread, the contrast)."""
    laplacian = image[1:-1, 1:-1] - 0.25 * (image[:-2, 1:-1] + image[2:, 1:-1] + image[1:-1, :-2] + image[1:-1, 2:])
    return float(np.median(np.abs(laplacian))), float(np.percentile(image, 95) - np.percentile(image, 5))


def test_hard_subgroup_renders_ap_portable_images_noisier_and_flatter(written, tmp_path):
    planted = write_siim_phantom(tmp_path / "hard", studies=STUDIES, seed=SEED, size=SIZE, progress=False,
                                 hard_subgroup="ap_portable", hard_subgroup_strength=0.5)
    hard = 0
    for path in sorted(written.glob("train/*/*/*.dcm")):
        twin = planted / path.relative_to(written)
        before, after = pydicom.dcmread(path), pydicom.dcmread(twin)
        assert from_header(before) == from_header(after)  # the same headers, planted or not
        if (after.ViewPosition, from_header(after).portable) != ("AP", "yes"):
            assert before.PixelData == after.PixelData
            continue
        hard += 1
        # As rendered (the stored values, same mapping in both files): flatter, and noisier for its contrast.
        (noise, contrast), (noise_hard, contrast_hard) = (noise_and_contrast(ds.pixel_array.astype(np.float64))
                                                          for ds in (before, after))
        assert contrast_hard < 0.85 * contrast
        assert noise_hard / contrast_hard > 1.2 * noise / contrast
        # As the model sees them (after the VOI, which may stretch the contrast back): still noisier.
        (noise, contrast), (noise_hard, contrast_hard) = (noise_and_contrast(read_dicom(p)[0]) for p in (path, twin))
        assert noise_hard / contrast_hard > 1.2 * noise / contrast
    assert hard >= 2
    manifest = json.loads((planted / "phantom.json").read_text())
    assert manifest["hard_subgroup"] == "ap_portable" and manifest["hard_subgroup_images"] == hard
    assert json.loads((written / "phantom.json").read_text())["hard_subgroup_images"] == 0
    for name in ("train_study_level.csv", "train_image_level.csv"):  # labels and boxes stay
        assert (planted / name).read_bytes() == (written / name).read_bytes()


def test_hard_subgroup_source_has_its_own_folder_and_its_metadata_names_the_images(tmp_path):
    options = dict(image_size=32, seed=0, cache_dir=tmp_path, studies=12, workers=1)
    planted = phantom_siim_source(**options, hard_subgroup="ap_portable")
    plain = phantom_siim_source(**options)
    assert len(list((tmp_path / "phantom").iterdir())) == 2  # planted and unplanted never share files
    hard = {}
    for split in ("train", "val", "test"):
        pairs = zip(planted.split(split), plain.split(split), strict=True)
        for a, b in pairs:
            assert a["image_id"] == b["image_id"] and a["meta"] == b["meta"]
            ap_portable = (a["meta"]["view"], a["meta"]["portable"]) == ("AP", "yes")
            hard[a["image_id"]] = ap_portable
            assert ap_portable != bool((a["image"] == b["image"]).all())
    assert any(hard.values()) and not all(hard.values())
    subgroups = planted.describe()["subgroups"]
    assert sum(subgroups[s]["portable"].get("yes", 0) for s in subgroups) == sum(hard.values())


def test_hard_subgroup_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="hard_subgroup must be one of none, ap_portable"):
        write_siim_phantom(tmp_path / "a", studies=3, size=32, hard_subgroup="pa")
    with pytest.raises(ValueError, match="hard_subgroup_strength must be between 0 and 1"):
        phantom_siim_source(image_size=32, cache_dir=tmp_path, studies=3, hard_subgroup="ap_portable",
                            hard_subgroup_strength=1.5)
    assert not list(tmp_path.iterdir())


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

    args = parser.parse_args(["phantom", str(tmp_path / "hard"), "--studies", "3", "--size", "32",
                              "--hard-subgroup", "ap_portable", "--hard-subgroup-strength", "0.8"])
    assert args.handler(args) == 0
    manifest = json.loads((tmp_path / "hard" / "phantom.json").read_text())
    assert (manifest["hard_subgroup"], manifest["hard_subgroup_strength"]) == ("ap_portable", 0.8)
    capsys.readouterr()

    args = parser.parse_args(["phantom", str(tmp_path / "bad"), "--studies", "3", "--difficulty", "2"])
    assert args.handler(args) == 2
    assert "difficulty must be between 0 and 1, got 2.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
