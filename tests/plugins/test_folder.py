"""corex_cxr.folder: PNG/JPEG/DICOM files with a CSV of labels and optional boxes."""

from __future__ import annotations

import csv
import hashlib
import json
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


# -- metadata --------------------------------------------------------------------------------------


def test_metadata_from_csv_columns_and_dicom_headers(folder, tmp_path):
    headers = {"PatientSex": "M", "PatientAge": "045Y", "ViewPosition": "PA", "Manufacturer": "SIEMENS",
               "StudyDescription": "XR CHEST"}
    write_dicom(folder / "e.dcm", np.rint(picture(3) * 4095).astype(np.uint16), bits_stored=12, headers=headers)
    write_csv(folder / "meta.csv", [
        ["path", "label", "sex", "age", "view", "portable"],
        ["a.png", "typical", "Female", "83", "ap", "yes"],
        ["c.jpg", "negative", "", "", "", ""],
        ["e.dcm", "atypical", "", "30", "", ""],  # the CSV's age wins; the header fills the rest
    ])
    data = source(folder, tmp_path, csv=Path("meta.csv"), box_columns=None, patient_column=None)
    meta = {item["image_id"]: item["meta"] for item in data.split("train")}
    blank = dict.fromkeys(meta["c.jpg"], "")
    assert meta["a.png"] == {**blank, "sex": "F", "age_band": "80+", "view": "AP", "portable": "yes"}
    assert meta["c.jpg"] == blank  # a JPEG without metadata columns
    assert meta["e.dcm"] == {**blank, "sex": "M", "age_band": "18-39", "view": "PA", "manufacturer": "SIEMENS",
                             "modality": "DX", "portable": "no"}
    assert data.describe()["subgroups"]["train"]["sex"] == {"": 1, "F": 1, "M": 1}


def test_unlabelled_corpus_reads_dicom_headers_and_tolerates_a_bad_one(folder, tmp_path):
    (folder / "broken.dcm").write_text("not a dicom")  # reported when decoding, not when scanning
    data = source(folder, tmp_path, csv=None, box_columns=None, patient_column=None, on_bad_sample="skip")
    meta = {item["image_id"]: item["meta"] for item in data.split("train")}
    assert meta["e.dcm"]["modality"] == "DX" and meta["a.png"]["modality"] == ""
    assert "broken.dcm" not in meta and data.skipped()[0]["path"].endswith("broken.dcm")


# -- unchanged by the metadata: hashes of items from before it existed ------------------------------


def test_folder_items_splits_and_order_are_unchanged(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    rng = np.random.default_rng(0)
    rows = [["path", "label", "x", "y", "width", "height", "patient"]]
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(root / f"im{i}.png")
        rows.append([f"im{i}.png", ["negative", "typical", "indeterminate", "atypical"][i % 4], i, 2, 5, 6, f"p{i // 2}"])
    write_csv(root / "labels.csv", rows)

    def digest(data) -> dict:
        found = {}
        for split in ("train", "val", "test"):
            h, items = hashlib.sha256(), data.split(split)
            for item in items:
                fields = [item["image_id"], item["study_id"], item["patient_id"], int(item["label"]), bool(item["has_mask"])]
                h.update(json.dumps(fields).encode())
                h.update(item["image"].numpy().tobytes())
                h.update(item["mask"].numpy().tobytes())
            found[split] = [len(items), h.hexdigest()[:16]]
        return found

    options = dict(image_size=32, cache_dir=tmp_path / "cache", workers=1, val_fraction=0.2, test_fraction=0.2)
    labelled = FolderSource(root=root, csv="labels.csv", box_columns=["x", "y", "width", "height"],
                            patient_column="patient", **options)
    assert digest(labelled) == {"train": [6, "77a47d016ee96c53"], "val": [2, "3cca5c1abbf0a37f"],
                                "test": [2, "32b8915943b84411"]}
    subset = sorted(item["image_id"] for item in labelled.split("train", label_fraction=0.3))
    assert hashlib.sha256(json.dumps(subset).encode()).hexdigest()[:16] == "6e78f31407948eb7"
    unlabelled = FolderSource(root=root, **options)
    assert digest(unlabelled) == {"train": [6, "f2e36bcfa6e573fe"], "val": [2, "5a9a4d3cd36857db"],
                                  "test": [2, "506719f9c9e3aa8c"]}


# -- issue 16: decompression bombs and file names that are not valid UTF-8 --------------------------------


def write_bomb(path: Path, width: int = 20000, height: int = 10000) -> None:
    """A valid 1-bit PNG of width x height (2e8) pixels, over twice Pillow's MAX_IMAGE_PIXELS, in ~25 kB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    squeeze, row = zlib.compressobj(9), b"\x00" + bytes((width + 7) // 8)
    pixels = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_a_bad_sample_like_any_other(folder, tmp_path):
    from corex_cxr.images import read_picture

    write_bomb(folder / "bomb.png")
    with pytest.raises(DataError, match="decompression-bomb limit") as info:
        read_picture(folder / "bomb.png")
    assert info.value.path == str(folder / "bomb.png") and "200000000 pixels" in info.value.reason
    with open(folder / "labels.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["bomb.png", "typical", "", "", "", "", "p9"])
    skipping = source(folder, tmp_path, on_bad_sample="skip")
    assert "bomb.png" not in {item["image_id"] for item in skipping.split("train")}
    [skipped] = [entry for entry in skipping.skipped() if entry["path"].endswith("bomb.png")]
    assert "decompression-bomb" in skipped["reason"]
    with pytest.raises(DataError, match=r"bomb\.png: not decoded, too many pixels"):
        source(folder, tmp_path / "strict").prepare()


def test_a_picture_over_the_warning_limit_is_not_decoded_either(folder, monkeypatch):
    """Between Pillow's limit and twice it Pillow only warns (and would decode it); corex refuses it too."""
    from PIL import Image as PILImage

    from corex_cxr.images import read_picture

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 2000)  # a.png has 48 x 64 = 3072 pixels
    with pytest.raises(DataError, match="MAX_IMAGE_PIXELS = 2000"):
        read_picture(folder / "a.png")


def test_printable_escapes_bytes_that_are_not_utf8_and_control_characters_only():
    import os

    from corex_cxr.errors import printable

    assert printable(os.fsdecode(b"/data/scan\xff.png")) == "/data/scan\\xff.png"
    assert printable(Path(os.fsdecode(b"a\xe9/b.png"))) == "a\\xe9/b.png"
    assert printable(b"raw\xfe.dcm") == "raw\\xfe.dcm"
    assert printable("tab\there.png") == "tab\\x09here.png"
    assert printable("Ünïcödé/ok.png") == "Ünïcödé/ok.png"  # valid names are unchanged
    error = DataError(os.fsdecode(b"x\xff.png"), "unreadable")
    assert str(error) == "x\\xff.png: unreadable" and error.path.encode("utf-8")


def test_a_file_name_that_is_not_utf8_works_through_the_cache_and_skipped_json(tmp_path, capsys):
    import os

    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.rint(picture(i) * 255).astype(np.uint8)).save(root / f"ok{i}.png")
    odd = os.fsdecode(os.path.join(os.fsencode(root), b"scan\xff.png"))
    Image.fromarray(np.rint(picture(5) * 255).astype(np.uint8)).save(odd)
    Path(os.fsdecode(os.path.join(os.fsencode(root), b"bad\xfe.png"))).write_bytes(b"not a png")
    options = {"csv": None, "box_columns": None, "patient_column": None, "on_bad_sample": "skip"}
    data = source(root, tmp_path, **options)
    items = {item["image_id"]: item for item in data.split("train")}
    assert set(items) == {"ok0.png", "ok1.png", "ok2.png", "scan\\xff.png"}
    assert items["scan\\xff.png"]["study_id"] == "scan\\xff.png" and float(items["scan\\xff.png"]["image"].max()) > 0
    index = json.loads((data.cache_path / "index.json").read_bytes().decode("utf-8"))
    assert "scan\\xff.png" in index["entries"] and "\\xfe" in index["entries"]["bad\\xfe.png"]["file"][0]
    listed = json.loads(data.skipped_list.read_bytes().decode("utf-8"))["skipped"]
    assert [entry["path"] for entry in listed] == [str(root / "bad\\xfe.png")]
    assert "4 images decoded" in capsys.readouterr().err
    again = source(root, tmp_path, **options)  # the file keys match: nothing is decoded again
    again.prepare()
    assert "0 images decoded, 4 reused" in capsys.readouterr().err
    assert again.skipped() == data.skipped()


def test_two_files_whose_names_read_the_same_are_reported(tmp_path):
    import os

    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(2):
        Image.fromarray(np.rint(picture(i) * 255).astype(np.uint8)).save(root / f"ok{i}.png")
    Image.fromarray(np.rint(picture(3) * 255).astype(np.uint8)).save(os.fsdecode(os.path.join(os.fsencode(root), b"scan\xff.png")))
    Image.fromarray(np.rint(picture(4) * 255).astype(np.uint8)).save(root / "scan\\xff.png")  # a literal backslash
    options = {"csv": None, "box_columns": None, "patient_column": None}
    with pytest.raises(DataError, match="rename one of them"):
        source(root, tmp_path, **options)
    data = source(root, tmp_path, on_bad_sample="skip", **options)
    assert len(data.skipped()) == 1 and len(data.split("train")) == 3


def test_under_torch_distributed_only_rank_0_prints_the_cache_summary(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    source(folder, tmp_path).prepare()
    assert "decoded" not in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    source(folder, tmp_path).prepare()
    assert "[rank 0/2] folder: 0 images decoded, 5 reused from the cache" in capsys.readouterr().err
