"""corex_cxr.chexpert: CheXpert in its real layout, uncertain labels, views, the official valid split."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from corex_cxr.chexpert import LABELS, ChexpertSource
from corex_cxr.errors import DataError
from corex_cxr.metadata import FIELDS

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS]
PREFIX = "CheXpert-v1.0-small"
TRAIN = [  # path below train/, sex, age, view, AP/PA, {observation: value}
    ("patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP",
     {"No Finding": "1.0", "Pneumothorax": "0.0", "Support Devices": "1.0"}),
    ("patient00002/study2/view1_frontal.jpg", "Female", 87, "Frontal", "AP",
     {"Cardiomegaly": "-1.0", "Lung Opacity": "1.0", "Pleural Effusion": "-1.0", "Fracture": "1.0"}),
    ("patient00002/study2/view2_lateral.jpg", "Female", 87, "Lateral", "",
     {"Cardiomegaly": "-1.0", "Lung Opacity": "1.0", "Pleural Effusion": "-1.0", "Fracture": "1.0"}),
    ("patient00002/study1/view1_frontal.jpg", "Female", 83, "Frontal", "AP", {"Lung Opacity": "1.0", "Fracture": "1.0"}),
    ("patient00003/study1/view1_frontal.jpg", "Male", 41, "Frontal", "AP", {"Edema": "1.0"}),
    ("patient00004/study1/view1_frontal.jpg", "Female", 20, "Frontal", "PA", {"No Finding": "1.0"}),
    ("patient00004/study1/view2_lateral.jpg", "Female", 20, "Lateral", "", {"No Finding": "1.0"}),
    ("patient00005/study1/view1_frontal.jpg", "Male", 33, "Frontal", "PA", {"Pneumonia": "1.0", "Edema": "0.0"}),
    ("patient00006/study1/view1_frontal.jpg", "Unknown", 0, "Frontal", "AP", {"Atelectasis": "-1.0"}),
    ("patient00007/study1/view1_frontal.jpg", "Male", 55, "Frontal", "AP", {"Pleural Effusion": "1.0"}),
    ("patient00008/study1/view1_frontal.jpg", "Male", 62, "Frontal", "AP", {"Consolidation": "1.0"}),
]
VALID = [
    ("patient64541/study1/view1_frontal.jpg", "Male", 73, "Frontal", "AP",
     {"Cardiomegaly": "1.0", "Lung Opacity": "1.0", "No Finding": "0.0"}),
    ("patient64542/study1/view1_frontal.jpg", "Male", 70, "Frontal", "PA", {"No Finding": "1.0"}),
    ("patient64542/study1/view2_lateral.jpg", "Male", 70, "Lateral", "", {"No Finding": "1.0"}),
]


def csv_rows(folder: str, rows) -> list[list]:
    return [[f"{PREFIX}/{folder}/{path}", sex, age, view, ap_pa, *(values.get(label, "") for label in LABELS)]
            for path, sex, age, view, ap_pa, values in rows]


def write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([HEADER, *rows])


def write_chexpert(parent: Path, valid: bool = True, name: str = PREFIX) -> Path:
    root = parent / name
    for folder, rows in (("train", TRAIN), ("valid", VALID)):
        for i, (path, *_) in enumerate(rows):
            file = root / folder / path
            file.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i).integers(0, 255, size=(40, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(file, quality=90)
    write_csv(root / "train.csv", csv_rows("train", TRAIN))
    if valid:
        write_csv(root / "valid.csv", csv_rows("valid", VALID))
    return root


def source(root: Path, tmp_path: Path, **options) -> ChexpertSource:
    return ChexpertSource(root=root, **{"image_size": 32, "cache_dir": tmp_path / "cache", "workers": 1, **options})


def all_items(data: ChexpertSource) -> dict[str, dict]:
    return {item["image_id"]: item for split in ("train", "val", "test") for item in data.split(split)}


@pytest.fixture
def chexpert(tmp_path) -> Path:
    return write_chexpert(tmp_path / "data")


UNCERTAIN_STUDY = "train/patient00002/study2/view1_frontal.jpg"


@pytest.mark.parametrize(("policy", "value"), [("ones", 1.0), ("zeros", 0.0), ("ignore", -1.0)])
def test_uncertain_policies_and_blank_labels(chexpert, tmp_path, policy, value):
    data = source(chexpert, tmp_path, uncertain=policy)
    assert data.multilabel and data.class_names == LABELS and len(LABELS) == 14
    item = all_items(data)[UNCERTAIN_STUDY]
    expected = {"Cardiomegaly": value, "Pleural Effusion": value, "Lung Opacity": 1.0, "Fracture": 1.0}
    assert item["labels"].dtype == torch.float32
    assert item["labels"].tolist() == [expected.get(label, 0.0) for label in LABELS]  # blank: 0
    assert int(item["label"]) == -1 and not bool(item["has_mask"]) and item["mask"].sum() == 0
    assert (item["study_id"], item["patient_id"]) == ("patient00002/study2", "patient00002")


def test_views(chexpert, tmp_path):
    frontal = source(chexpert, tmp_path)
    assert not any("lateral" in image for image in all_items(frontal))
    assert frontal.describe()["other_views"] == 3
    lateral = all_items(source(chexpert, tmp_path, views="lateral"))
    assert set(lateral) == {"train/patient00002/study2/view2_lateral.jpg", "train/patient00004/study1/view2_lateral.jpg",
                            "valid/patient64542/study1/view2_lateral.jpg"}
    assert {item["meta"]["view"] for item in lateral.values()} == {"LATERAL"}
    both = source(chexpert, tmp_path, views="all")
    assert len(all_items(both)) == len(TRAIN) + len(VALID) and both.describe()["other_views"] == 0
    assert both.cache_path != frontal.cache_path  # another set of images, another cache


def test_valid_csv_is_the_validation_split_and_test_is_carved_by_patient(chexpert, tmp_path):
    data = source(chexpert, tmp_path, test_fraction=0.3, val_fraction=0.5)  # val_fraction: unused
    split = {s: {item["image_id"] for item in data.split(s)} for s in ("train", "val", "test")}
    assert split["val"] == {"valid/patient64541/study1/view1_frontal.jpg", "valid/patient64542/study1/view1_frontal.jpg"}
    assert split["test"] and split["train"]
    patients = {s: {image.split("/")[1] for image in images} for s, images in split.items()}
    assert not patients["train"] & patients["test"]
    assert data.describe()["official_split"] is True
    with pytest.raises(ValueError, match="folds: chexpert's validation split is valid.csv"):
        source(chexpert, tmp_path, folds=3)


def test_without_valid_csv_splits_are_patient_grouped(tmp_path):
    data = source(write_chexpert(tmp_path / "data", valid=False), tmp_path, val_fraction=0.0, test_fraction=0.25)
    patients = {s: {item["patient_id"] for item in data.split(s)} for s in ("train", "test")}
    assert len(patients["test"]) == 2 and len(patients["train"]) == 6 and not patients["train"] & patients["test"]
    assert data.describe()["official_split"] is False


def test_paths_relative_to_root_or_a_renamed_root(tmp_path):
    renamed = write_chexpert(tmp_path / "data", name="chexpert_small")  # Path still says CheXpert-v1.0-small/
    assert len(all_items(source(renamed, tmp_path))) == 11  # the frontal images
    rows = csv_rows("train", TRAIN)
    for row in rows:
        row[0] = row[0].removeprefix(f"{PREFIX}/")  # relative to root itself
    write_csv(renamed / "train.csv", rows)
    items = all_items(source(renamed, tmp_path))
    assert len(items) == 11 and UNCERTAIN_STUDY in items  # the same image ids either way


def test_metadata_batches_and_describe(chexpert, tmp_path):
    data = source(chexpert, tmp_path, val_fraction=0.0, test_fraction=0.0)
    items = all_items(data)
    blank = dict.fromkeys(FIELDS, "")
    assert items[UNCERTAIN_STUDY]["meta"] == {**blank, "sex": "F", "age_band": "80+", "view": "AP"}
    assert items["train/patient00006/study1/view1_frontal.jpg"]["meta"] == {**blank, "age_band": "0-17", "view": "AP"}
    batch = next(iter(DataLoader(data.split("train"), batch_size=3)))
    assert batch["labels"].shape == (3, 14) and batch["labels"].dtype == torch.float32
    assert set(batch["meta"]) == set(FIELDS) and len(batch["meta"]["view"]) == 3
    summary = data.describe()
    assert summary["train"]["studies"] == 9 and summary["train"]["patients"] == 8
    assert summary["train"]["classes"]["Lung Opacity"] == 2 and summary["train"]["classes"]["Cardiomegaly"] == 0
    assert summary["val"]["classes"]["Cardiomegaly"] == 1
    assert summary["subgroups"]["train"]["sex"] == {"": 1, "F": 4, "M": 4}
    assert summary["uncertain"] == "ignore" and summary["views"] == "frontal"


def test_label_fractions_are_deterministic_and_nested(chexpert, tmp_path):
    data = source(chexpert, tmp_path, val_fraction=0.0, test_fraction=0.0)
    full = {item["image_id"] for item in data.split("train")}
    half = {item["image_id"] for item in data.split("train", label_fraction=0.5)}
    small = {item["image_id"] for item in data.split("train", label_fraction=0.1)}
    assert small <= half <= full and len(small) < len(full)
    again = source(chexpert, tmp_path, val_fraction=0.0, test_fraction=0.0)
    assert {item["image_id"] for item in again.split("train", label_fraction=0.5)} == half


def test_bad_rows_are_reported_or_skipped(chexpert, tmp_path):
    rows = csv_rows("train", TRAIN)
    bad = [list(rows[0]) for _ in range(4)]
    for i, row in enumerate(bad[:3]):
        row[0] = f"{PREFIX}/train/patient0001{i}/study1/view1_frontal.jpg"  # no such file
    bad[1][HEADER.index("Edema")] = "2.0"  # not a label value
    bad[2][3] = "Oblique"  # not Frontal or Lateral
    bad[3][0] = f"{PREFIX}/train/view1_frontal.jpg"  # no patient/study folders
    write_csv(chexpert / "train.csv", [*rows, rows[4], *bad])  # rows[4] listed again
    with pytest.raises(DataError) as caught:
        source(chexpert, tmp_path)
    message = str(caught.value)
    for reason in ("line 13 ('CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg'): image listed again "
                   "(first on line 6 of train.csv)",
                   "patient00010/study1/view1_frontal.jpg: file listed on line 14 of train.csv does not exist",
                   "line 15 ('CheXpert-v1.0-small/train/patient00011/study1/view1_frontal.jpg'): Edema is '2.0'",
                   "line 16 ('CheXpert-v1.0-small/train/patient00012/study1/view1_frontal.jpg'): Frontal/Lateral is 'Oblique'",
                   "line 17 ('CheXpert-v1.0-small/train/view1_frontal.jpg'): Path has no patientNNNNN/studyN/ folders"):
        assert reason in message
    assert len(caught.value.problems) == 5
    data = source(chexpert, tmp_path, on_bad_sample="skip")
    assert len(data.skipped()) == 5 and len(all_items(data)) == 11
    with pytest.raises(ValueError, match="uncertain must be one of ones, zeros, ignore"):
        source(chexpert, tmp_path, uncertain="maybe")
    with pytest.raises(DataError, match="train.csv: CSV file does not exist"):
        source(tmp_path, tmp_path)
