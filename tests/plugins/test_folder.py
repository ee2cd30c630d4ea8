"""corex_cxr.folder: PNG/JPEG/DICOM files with a CSV of labels and optional boxes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corex_cxr.dicom import write_dicom
from corex_cxr.errors import DataError
from corex_cxr.folder import FolderSource


def picture(seed: int, boxes=()) -> np.ndarray:
    """48 x 64 (rows x columns) in [0, 1]: dim noise, bright inside each (x, y, w, h) box."""
    image = np.random.default_rng(seed).uniform(0.1, 0.3, size=(48, 64))
    for x, y, w, h in boxes:
        image[y : y + h, x : x + w] = 1.0
    return image


def write_csv(path: Path, rows: list[list]) -> None:
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows(rows)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Four images in four formats; a.png has two boxes on two rows; d.png is unlabelled."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.rint(picture(0, [(4, 4, 10, 10), (40, 20, 12, 8)]) * 255).astype(np.uint8)).save(root / "a.png")
    Image.fromarray(np.rint(picture(1, [(20, 10, 16, 16)]) * 65535).astype(np.uint16)).save(root / "sub" / "b.png")
    Image.fromarray(np.rint(picture(2) * 255).astype(np.uint8)).save(root / "c.jpg", quality=95)
    write_dicom(root / "e.dcm", np.rint(picture(3) * 4095).astype(np.uint16), bits_stored=12)
    Image.fromarray(np.rint(picture(4) * 255).astype(np.uint8)).save(root / "d.png")
    write_csv(
        root / "labels.csv",
        [
            ["path", "label", "x", "y", "width", "height", "patient"],
            ["a.png", "Typical", 4, 4, 10, 10, "p1"],
            ["a.png", "typical", 40, 20, 12, 8, "p1"],
            ["sub/b.png", "2", 20, 10, 16, 16, "p2"],
            ["c.jpg", "negative", "", "", "", "", "p3"],
            ["e.dcm", "atypical", "", "", "", "", "p1"],
            ["d.png", "", "", "", "", "", "p4"],
        ],
    )
    return root


def source(root: Path, tmp_path: Path, **options) -> FolderSource:
    options = {
        "csv": Path("labels.csv"),
        "image_size": 32,
        "cache_dir": tmp_path / "cache",
        "box_columns": ["x", "y", "width", "height"],
        "patient_column": "patient",
        "val_fraction": 0.0,
        "test_fraction": 0.0,
        "workers": 1,
        **options,
    }
    return FolderSource(root=root, **options)


def test_rows_of_one_image_merge_and_labels_boxes_patients_arrive(folder, tmp_path):
    data = source(folder, tmp_path)
    items = {item["image_id"]: item for item in data.split("train")}
    assert set(items) == {"a.png", "sub/b.png", "c.jpg", "e.dcm", "d.png"}
    labels = {image: int(item["label"]) for image, item in items.items()}
    assert labels == {"a.png": 1, "sub/b.png": 2, "c.jpg": 0, "e.dcm": 3, "d.png": -1}
    assert all(bool(item["has_mask"]) for item in items.values())  # box columns given: real masks
    assert items["a.png"]["mask"].sum() == 5 * 5 + 6 * 4  # both boxes, at half size
    assert items["c.jpg"]["mask"].sum() == 0
    for image in ("a.png", "sub/b.png"):  # 16-bit PNG too: the mask covers the bright pixels
        mask, bright = items[image]["mask"][0].bool(), items[image]["image"][0] > 0.6
        assert (mask & bright).sum() / (mask | bright).sum() > 0.85
    assert items["a.png"]["patient_id"] == items["e.dcm"]["patient_id"] == "p1"
    assert items["c.jpg"]["study_id"] == "c.jpg"  # no study column: each image is its own study
    summary = data.describe()["train"]
    assert summary["images"] == 5 and summary["patients"] == 4
    assert summary["classes"] == {"negative": 1, "typical": 1, "indeterminate": 1, "atypical": 1}


def test_without_boxes_no_image_has_a_mask_and_custom_classes_apply(folder, tmp_path):
    write_csv(folder / "two.csv", [["file", "finding"], ["a.png", "covid"], ["c.jpg", "normal"], ["d.png", "1"]])
    data = source(
        folder, tmp_path, csv=folder / "two.csv", image_column="file", label_column="finding",
        classes=["normal", "covid"], box_columns=None, patient_column=None,
    )
    assert data.class_names == ("normal", "covid")
    items = {item["image_id"]: item for item in data.split("train")}
    assert {image: int(item["label"]) for image, item in items.items()} == {"a.png": 1, "c.jpg": 0, "d.png": 1}
    assert not any(bool(item["has_mask"]) for item in items.values())


def test_siim_style_boxes_column(folder, tmp_path):
    write_csv(
        folder / "siim.csv",
        [
            ["path", "label", "boxes"],
            ["sub/b.png", "typical", "[{'x': 20, 'y': 10, 'width': 16, 'height': 16}]"],
            ["c.jpg", "negative", "nan"],
        ],
    )
    data = source(folder, tmp_path, csv=Path("siim.csv"), box_columns=None, boxes_column="boxes", patient_column=None)
    items = {item["image_id"]: item for item in data.split("train")}
    assert items["sub/b.png"]["mask"].sum() == 8 * 8 and bool(items["c.jpg"]["has_mask"])


def test_bad_rows_are_all_reported_or_skipped(folder, tmp_path):
    write_csv(
        folder / "bad.csv",
        [
            ["path", "label", "x", "y", "width", "height"],
            ["a.png", "pneumonia", "", "", "", ""],  # unknown class
            ["sub/b.png", "typical", "1", "2", "wide", "4"],  # not a number
            ["missing.png", "typical", "", "", "", ""],  # no such file
            ["c.jpg", "negative", "", "", "", ""],
            ["c.jpg", "typical", "", "", "", ""],  # contradicts line 5
            ["d.png", "7", "", "", "", ""],  # index out of range
            ["e.dcm", "atypical", "", "", "", ""],
        ],
    )
    with pytest.raises(DataError) as caught:
        source(folder, tmp_path, csv=Path("bad.csv"), patient_column=None)
    message = str(caught.value)
    for reason in (
        "line 2 ('a.png'): label 'pneumonia' is neither a class name",
        "line 3 ('sub/b.png'): box columns",
        "missing.png: file listed on line 4 of bad.csv does not exist",
        "line 6 ('c.jpg'): label, study or patient differs from line 5",
        "line 7 ('d.png'): label '7'",
    ):
        assert reason in message
    assert len(caught.value.problems) == 5

    data = source(folder, tmp_path, csv=Path("bad.csv"), patient_column=None, on_bad_sample="skip")
    assert [item["image_id"] for item in data.split("train")] == ["e.dcm"]
    assert len(data.skipped()) == 5


def test_undecodable_picture_is_found_when_the_cache_is_built(folder, tmp_path):
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    with pytest.raises(DataError, match="a.png: not a readable PNG/JPEG image"):
        source(folder, tmp_path).prepare()
    data = source(folder, tmp_path, on_bad_sample="skip")
    assert "a.png" not in {item["image_id"] for item in data.split("train")}
    assert data.skipped()[0]["path"] == str(folder / "a.png")


def test_wrong_options_and_columns_get_specific_errors(folder, tmp_path):
    with pytest.raises(ValueError, match="box_columns must name 4 columns"):
        source(folder, tmp_path, box_columns=["x", "y"])
    with pytest.raises(ValueError, match="set box_columns or boxes_column, not both"):
        source(folder, tmp_path, boxes_column="boxes")
    with pytest.raises(ValueError, match="classes must be distinct names"):
        source(folder, tmp_path, classes=["a", "a"])
    with pytest.raises(DataError, match=r"labels.csv: missing column\(s\) 'study'"):
        source(folder, tmp_path, study_column="study")
    with pytest.raises(DataError, match="CSV file does not exist"):
        source(folder, tmp_path, csv=Path("nope.csv"))
