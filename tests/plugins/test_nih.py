"""corex_cxr.nih: NIH ChestX-ray14 in its real layout, multi-label targets, official split, metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from corex_cxr.errors import DataError
from corex_cxr.metadata import FIELDS
from corex_cxr.nih import LABELS, NihSource

# The real file's header: its bracketed names hold commas, and every line ends in one.
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
ROWS = [  # image, findings, follow-up, patient, age, sex, view
    ("00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA"),
    ("00000001_002.png", "Cardiomegaly|Effusion", 2, 1, 58, "M", "PA"),
    ("00000002_000.png", "No Finding", 0, 2, 81, "M", "PA"),
    ("00000003_000.png", "Hernia", 0, 3, 74, "F", "PA"),
    ("00000003_001.png", "Hernia", 1, 3, 75, "F", "PA"),
    ("00000004_000.png", "Mass|Nodule", 0, 4, 82, "M", "AP"),
    ("00000005_000.png", "No Finding", 0, 5, 69, "F", "PA"),
    ("00000006_000.png", "Infiltration", 0, 6, 414, "F", "AP"),  # the real CSV has a few such ages
    ("00000007_000.png", "Atelectasis|Pneumothorax", 0, 7, 30, "M", "AP"),
    ("00000008_000.png", "Pleural_Thickening", 0, 8, 12, "F", "PA"),
    ("00000009_000.png", "No Finding", 0, 9, 45, "M", "PA"),
    ("00000010_000.png", "Edema|Consolidation|Pneumonia|Fibrosis", 0, 10, 60, "F", "AP"),
]
TEST_LIST = ["00000003_000.png", "00000003_001.png", "00000007_000.png", "00000010_000.png"]


def write_nih(root: Path, rows=ROWS, lists: bool = True, images: str = "images") -> Path:
    (root / images).mkdir(parents=True)
    lines = [HEADER]
    for i, (name, findings, follow_up, patient, age, sex, view) in enumerate(rows):
        pixels = np.random.default_rng(i).integers(0, 255, size=(40, 36), dtype=np.uint8)
        Image.fromarray(pixels).save(root / images / name)
        lines.append(f"{name},{findings},{follow_up},{patient},{age},{sex},{view},2500,2048,0.143,0.143,")
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    if lists:
        (root / "test_list.txt").write_text("\n".join(TEST_LIST) + "\n")
        (root / "train_val_list.txt").write_text("\n".join(r[0] for r in rows if r[0] not in TEST_LIST) + "\n")
    return root


def source(root: Path, tmp_path: Path, **options) -> NihSource:
    return NihSource(root=root, **{"image_size": 32, "cache_dir": tmp_path / "cache", "workers": 1, **options})


def all_items(data: NihSource) -> dict[str, dict]:
    return {item["image_id"]: item for split in ("train", "val", "test") for item in data.split(split)}


def target(*names: str) -> list[float]:
    return [float(label in names) for label in LABELS]


@pytest.fixture
def nih(tmp_path) -> Path:
    return write_nih(tmp_path / "nih")


def test_findings_become_multilabel_targets(nih, tmp_path):
    data = source(nih, tmp_path)
    assert data.multilabel and data.class_names == LABELS and len(LABELS) == 14
    items = all_items(data)
    assert set(items) == {row[0] for row in ROWS}
    expected = {"00000001_002.png": target("Cardiomegaly", "Effusion"), "00000002_000.png": target(),
                "00000010_000.png": target("Edema", "Consolidation", "Pneumonia", "Fibrosis"),
                "00000008_000.png": target("Pleural_Thickening")}
    for name, labels in expected.items():
        item = items[name]
        assert item["labels"].dtype == torch.float32 and item["labels"].tolist() == labels
        assert int(item["label"]) == -1 and not bool(item["has_mask"]) and item["mask"].sum() == 0
        assert item["study_id"] == name  # each image is its own study
    assert items["00000001_001.png"]["patient_id"] == "1"


def test_official_split_lists_are_honoured(nih, tmp_path):
    data = source(nih, tmp_path, val_fraction=0.25, test_fraction=0.5)  # test_fraction: unused
    split = {s: {item["image_id"] for item in data.split(s)} for s in ("train", "val", "test")}
    assert split["test"] == set(TEST_LIST)
    assert split["val"] and split["train"]
    patients = {s: {name.split("_")[0] for name in names} for s, names in split.items()}
    assert not (patients["train"] & patients["val"])
    assert data.describe()["official_split"] is True


def test_without_the_lists_splits_are_patient_grouped(tmp_path):
    data = source(write_nih(tmp_path / "nih", lists=False), tmp_path, val_fraction=0.2, test_fraction=0.2)
    patients = {s: {item["patient_id"] for item in data.split(s)} for s in ("train", "val", "test")}
    assert all(patients.values()) and sum(map(len, patients.values())) == 10
    assert not (patients["train"] & patients["test"] or patients["train"] & patients["val"])
    assert data.describe()["official_split"] is False


def test_metadata_comes_from_the_csv(nih, tmp_path):
    items = all_items(source(nih, tmp_path))
    blank = dict.fromkeys(FIELDS, "")
    assert items["00000002_000.png"]["meta"] == {**blank, "sex": "M", "age_band": "80+", "view": "PA"}
    assert items["00000006_000.png"]["meta"] == {**blank, "sex": "F", "view": "AP"}  # age 414: unknown
    assert items["00000008_000.png"]["meta"]["age_band"] == "0-17"


def test_batches_and_describe(nih, tmp_path):
    data = source(nih, tmp_path, val_fraction=0.0)
    batch = next(iter(DataLoader(data.split("train"), batch_size=4)))
    assert batch["labels"].shape == (4, 14) and batch["labels"].dtype == torch.float32
    assert batch["label"].tolist() == [-1] * 4
    assert set(batch["meta"]) == set(FIELDS) and len(batch["meta"]["sex"]) == 4
    summary = data.describe()
    assert summary["test"]["studies"] == 4 and summary["test"]["patients"] == 3
    assert summary["train"]["classes"]["Cardiomegaly"] == 3 and summary["test"]["classes"]["Hernia"] == 2
    assert summary["subgroups"]["test"]["sex"] == {"F": 3, "M": 1}
    assert summary["subgroups"]["test"]["view"] == {"AP": 2, "PA": 2}


def test_label_fractions_are_deterministic_nested_and_whole_patients_stay_in_one_split(nih, tmp_path):
    data = source(nih, tmp_path, val_fraction=0.0)
    full = {item["image_id"] for item in data.split("train")}
    half = {item["image_id"] for item in data.split("train", label_fraction=0.5)}
    small = {item["image_id"] for item in data.split("train", label_fraction=0.2)}
    assert small <= half < full
    again = source(nih, tmp_path, val_fraction=0.0)
    assert {item["image_id"] for item in again.split("train", label_fraction=0.5)} == half
    # every stratum (rarest positive finding, or none) keeps at least one study
    assert any(item["labels"].sum() == 0 for item in data.split("train", label_fraction=0.2))


def test_kaggle_folders_and_unreferenced_images(tmp_path):
    root = write_nih(tmp_path / "nih", images="images_001/images")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "images_001" / "images" / "stray.png")
    data = source(root, tmp_path)
    assert len(all_items(data)) == len(ROWS) and data.describe()["unreferenced_images"] == 1


def test_bad_rows_are_reported_or_skipped(tmp_path):
    rows = [*ROWS,
            ("00000011_000.png", "Pneumonitis", 0, 11, 50, "M", "PA"),  # unknown finding
            ("00000012_000.png", "No Finding|Mass", 0, 12, 50, "M", "PA"),  # contradicts itself
            ("00000013_000.png", "Mass", 0, "", 50, "M", "PA")]  # no patient
    root = write_nih(tmp_path / "nih", rows=rows)
    lines = (root / "Data_Entry_2017.csv").read_text().splitlines()
    lines.append("00000001_000.png,Mass,0,1,58,M,PA,2500,2048,0.143,0.143,")  # listed again
    lines.append("00000099_000.png,Mass,0,99,58,M,PA,2500,2048,0.143,0.143,")  # no such file
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as caught:
        source(root, tmp_path)
    message = str(caught.value)
    for reason in ("line 15 ('00000011_000.png'): unknown finding(s) 'Pneumonitis'",
                   "line 16 ('00000012_000.png'): 'No Finding' together with findings",
                   "line 17 ('00000013_000.png'): empty Patient ID",
                   "line 18 ('00000001_000.png'): image listed again (first on line 2)",
                   "00000099_000.png: file listed on line 19 of Data_Entry_2017.csv is not in images/"):
        assert reason in message
    assert len(caught.value.problems) == 5
    data = source(root, tmp_path, on_bad_sample="skip")
    assert len(data.skipped()) == 5 and len(all_items(data)) == len(ROWS)
    with pytest.raises(DataError, match="Data_Entry_2017.csv: CSV file does not exist"):
        source(tmp_path, tmp_path)
