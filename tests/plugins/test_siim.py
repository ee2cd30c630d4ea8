"""corex_cxr.siim, .source and .cache: the SIIM layout with its quirks, items, masks, splits,
bad-data handling, the decode-once cache and the dataset factories."""

from __future__ import annotations

import contextlib
import csv
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
import pytest
import torch
from torch.utils.data import DataLoader

import corex_cxr
from corex.testing import assert_mirrors
from corex_cxr.cache import build_cache, decode_to_cache
from corex_cxr.dicom import write_dicom
from corex_cxr.errors import DataError
from corex_cxr.images import read_image
from corex_cxr.metadata import FIELDS
from corex_cxr.siim import CLASS_COLUMNS, SiimSource

BOX = (10.0, 8.0, 20.0, 12.0)  # x, y, width, height in the 64 x 48 originals
BOXES = "[{'x': 10.0, 'y': 8.0, 'width': 20.0, 'height': 12.0}]"
OPACITY = "opacity 1 10.0 8.0 30.0 20.0"
NONE = "none 1 0 0 1 1"


def radiograph(seed: int, boxed: bool) -> np.ndarray:
    """64 x 48 12-bit pixels: a dim textured background, bright inside BOX when ``boxed``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(200, 900, size=(48, 64))
    if boxed:
        x, y, w, h = map(int, BOX)
        pixels[y : y + h, x : x + w] = 3800
    return pixels.astype(np.uint16)


def write_siim(root: Path, patients: int = 12) -> dict[str, dict]:
    """A small SIIM layout. Patient p has study s<p> with label p % 4; patient 0 has a second study
    (s0b, negative); study s1 has two images, the second without boxes (NaN); patient 2's file
    has no PatientID. Returns image id -> what the loader should find."""
    expected: dict[str, dict] = {}
    study_rows, image_rows = [], []
    plan = [(f"s{p}", p % 4, f"P{p}") for p in range(patients)] + [("s0b", 0, "P0")]
    for study, label, patient in plan:
        study_rows.append([f"{study}_study", *(int(label == k) for k in range(4))])
        images = 2 if study == "s1" else 1
        for k in range(images):
            image = f"{study}i{k}"
            boxed = label != 0 and k == 0
            header_patient = "" if patient == "P2" else patient
            folder = root / "train" / study / "series0"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = radiograph(len(expected), boxed)
            write_dicom(folder / f"{image}.dcm", pixels, bits_stored=12, patient_id=header_patient)
            boxes = BOXES if boxed else ("nan" if label else "")
            image_rows.append([f"{image}_image", boxes, OPACITY if boxed else NONE, study])
            found_patient = patient if patient != "P2" else study  # no PatientID: the study stands in
            expected[image] = {"study": study, "label": label, "patient": found_patient, "boxed": boxed}
    write_csv(root / "train_study_level.csv", ["id", *CLASS_COLUMNS], study_rows)
    write_csv(root / "train_image_level.csv", ["id", "boxes", "label", "StudyInstanceUID"], image_rows)
    return expected


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as file:
        return list(csv.reader(file))


def source(root: Path, tmp_path: Path, **options) -> SiimSource:
    options = {"image_size": 32, "seed": 0, "cache_dir": tmp_path / "cache", "workers": 1, **options}
    return SiimSource(root=root, **options)


@pytest.fixture
def siim(tmp_path) -> tuple[Path, dict[str, dict]]:
    root = tmp_path / "siim"
    return root, write_siim(root)


# -- items, labels, masks, splits ------------------------------------------------------------------


def test_items_carry_study_labels_masks_and_ids(siim, tmp_path):
    root, expected = siim
    data = source(root, tmp_path)
    assert not data.cache_path.exists()  # building reads headers only; nothing decoded yet
    seen = {}
    for split in ("train", "val", "test"):
        for item in data.split(split):
            seen[item["image_id"]] = item
    assert set(seen) == set(expected)
    for image_id, item in seen.items():
        truth = expected[image_id]
        assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0 and item["label"] == truth["label"]
        # Annotated: boxed images and negative studies; a positive study's unboxed image is not.
        assert item["has_mask"].dtype == torch.bool
        assert bool(item["has_mask"]) == (truth["boxed"] or truth["label"] == 0)
        assert (item["study_id"], item["patient_id"]) == (truth["study"], truth["patient"])
        mask, bright = item["mask"][0].bool(), item["image"][0] > 0.5
        if truth["boxed"]:  # 64 x 48 -> 32 x 32: scale 0.5, 4 px of padding on top and bottom
            assert mask.sum() == 10 * 6 and mask[4 + 4 : 4 + 10, 5:15].all()
            assert (mask & bright).sum() / (mask | bright).sum() > 0.9
        else:
            assert mask.sum() == 0
    assert (seen["s0i0"]["image"][0, :4] == 0).all()  # the padding is air


def test_describe_counts_and_patient_grouping(siim, tmp_path):
    root, expected = siim
    folder = root / "train" / "s3" / "series0"
    (folder / "stray.dcm").write_bytes((folder / "s3i0.dcm").read_bytes())  # on disk, not in the CSV
    data = source(root, tmp_path, val_fraction=0.25, test_fraction=0.25)
    summary = data.describe()
    assert summary["unreferenced_images"] == 1
    assert sum(summary[s]["images"] for s in ("train", "val", "test")) == len(expected)
    assert sum(summary[s]["studies"] for s in ("train", "val", "test")) == 13
    assert sum(sum(summary[s]["classes"].values()) for s in ("train", "val", "test")) == 13
    assert summary["test"]["patients"] == 3 and summary["val"]["patients"] == 3
    patients = {s: {item["patient_id"] for item in data.split(s)} for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"])
    assert not patients["val"] & patients["test"]
    assert data.class_names == ("negative", "typical", "indeterminate", "atypical") and data.multilabel is False
    assert data.normalization["range"] == [0.0, 1.0] and data.normalization["image_size"] == 32


def test_label_fraction_keeps_whole_studies_and_is_nested(siim, tmp_path):
    root, _ = siim
    data = source(root, tmp_path, val_fraction=0.0, test_fraction=0.0)
    full = {item["image_id"] for item in data.split("train")}
    half = {item["image_id"] for item in data.split("train", label_fraction=0.5)}
    small = data.split("train", label_fraction=0.01)
    assert {item["image_id"] for item in small} < half < full
    assert sorted(int(item["label"]) for item in small if item["image_id"] != "s1i1") == [0, 1, 2, 3]
    assert ("s1i0" in half) == ("s1i1" in half)  # every image of a chosen study


def test_batches_collate_and_load_in_worker_processes(siim, tmp_path):
    root, _ = siim
    train = source(root, tmp_path, val_fraction=0.0, test_fraction=0.0).split("train")
    batch = next(iter(DataLoader(train, batch_size=4, num_workers=2)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["label"].shape == (4,)
    assert batch["has_mask"].dtype == torch.bool and isinstance(batch["study_id"], list)
    # meta collates into a dict of lists of str; single-class sources carry no multi-label target
    assert set(batch["meta"]) == set(FIELDS) and batch["meta"]["modality"] == ["DX"] * 4
    assert all(isinstance(value, str) for values in batch["meta"].values() for value in values)
    assert "labels" not in batch


def test_metadata_comes_from_the_headers_and_is_counted_per_split(siim, tmp_path):
    root, expected = siim
    headers = {"PatientSex": "F", "PatientAge": "072Y", "ViewPosition": "AP", "Manufacturer": "GE Healthcare ",
               "SeriesDescription": "CHEST AP PORTABLE", "BodyPartExamined": "CHEST"}
    path = root / "train" / "s3" / "series0" / "s3i0.dcm"
    write_dicom(path, radiograph(99, False), bits_stored=12, patient_id="P3", headers=headers)
    data = source(root, tmp_path, val_fraction=0.25, test_fraction=0.25)
    items = {item["image_id"]: item for split in ("train", "val", "test") for item in data.split(split)}
    assert items["s3i0"]["meta"] == {"sex": "F", "age_band": "60-79", "view": "AP", "manufacturer": "GE Healthcare",
                                     "modality": "DX", "portable": "yes", "body_part": "CHEST"}
    assert items["s0i0"]["meta"] == {**dict.fromkeys(FIELDS, ""), "modality": "DX"}  # write_dicom's headers
    subgroups = data.describe()["subgroups"]
    assert set(subgroups) == {"train", "val", "test"}
    assert sum(subgroups[s]["sex"].get("F", 0) for s in subgroups) == 1
    assert sum(sum(subgroups[s]["modality"].values()) for s in subgroups) == len(expected)


# -- bad data --------------------------------------------------------------------------------------


def break_layout(root: Path) -> None:
    """One of every problem the loader must report."""
    (root / "train" / "s4" / "series0" / "s4i0.dcm").write_text("not a dicom")  # corrupt file
    (root / "train" / "s5" / "series0" / "s5i0.dcm").unlink()  # a row naming a missing file
    rows = read_rows(root / "train_image_level.csv")
    for row in rows:
        if row[0] == "s6i0_image":
            row[1] = "[{'x': 1, 'y': oops}]"  # malformed boxes
        if row[0] == "s7i0_image":
            row[2] = "opacity 1 10 8 30"  # malformed label
    rows.append(["ghost_image", "", NONE, "nowhere"])  # an image of an unknown study
    write_csv(root / "train_image_level.csv", rows[0], rows[1:])
    study_rows = read_rows(root / "train_study_level.csv")
    study_rows[9][1:] = ["1", "1", "0", "0"]  # line 10, study s8: two classes
    study_rows.append(["lonely_study", "1", "0", "0", "0"])  # a study without images
    write_csv(root / "train_study_level.csv", study_rows[0], study_rows[1:])


EXPECTED_PROBLEMS = [
    ("s4i0.dcm", "not a DICOM file"),
    ("train_image_level.csv", "no file train/s5/*/s5i0.dcm on disk"),
    ("train_image_level.csv", "malformed boxes"),
    ("train_image_level.csv", "malformed label"),
    ("train_image_level.csv", "StudyInstanceUID 'nowhere' is not in train_study_level.csv"),
    ("train_study_level.csv", "line 10 (id 's8_study'): expected exactly one 1"),
    ("train_study_level.csv", "no image of study 'lonely' is both in train_image_level.csv and on disk"),
    ("train_study_level.csv", "no image of study 's5' is both"),  # its only file is missing
    ("train_image_level.csv", "StudyInstanceUID 's8' is not in"),  # its study row was refused
]


def test_every_problem_is_reported_at_once(siim, tmp_path):
    root, _ = siim
    break_layout(root)
    with pytest.raises(DataError) as caught:
        source(root, tmp_path)
    message = str(caught.value)
    assert "unusable sample(s); fix them or set on_bad_sample: skip" in message
    for path, reason in EXPECTED_PROBLEMS:
        assert any(p["path"].endswith(path) and reason in p["reason"] for p in caught.value.problems), reason
        assert reason in message
    assert "s5i0" in message and "s6i0" in message and "s7i0" in message  # rows named by id and line


def test_skip_drops_and_reports_every_problem(siim, tmp_path):
    root, expected = siim
    break_layout(root)
    data = source(root, tmp_path, on_bad_sample="skip", val_fraction=0.0, test_fraction=0.0)
    skipped = data.skipped()
    assert len(skipped) == len(EXPECTED_PROBLEMS)
    assert all(set(entry) == {"path", "reason"} for entry in skipped)
    kept = {item["image_id"] for item in data.split("train")}
    assert kept == set(expected) - {"s4i0", "s5i0", "s6i0", "s7i0", "s8i0"}


def test_files_that_fail_to_decode_are_found_by_prepare(siim, tmp_path):
    root, _ = siim
    path = root / "train" / "s3" / "series0" / "s3i0.dcm"
    path.write_bytes(path.read_bytes()[:-2000])  # pixel data cut short: the header still reads
    strict = source(root, tmp_path)
    with pytest.raises(DataError, match="pixel data cannot be decoded") as caught:
        strict.prepare()
    assert caught.value.problems[0]["path"] == str(path)

    lenient = source(root, tmp_path, on_bad_sample="skip", val_fraction=0.0, test_fraction=0.0)
    assert "s3i0" not in {item["image_id"] for item in lenient.split("train")}
    assert [entry["path"] for entry in lenient.skipped()] == [str(path)]


def test_missing_column_names_csv_and_column(siim, tmp_path):
    root, _ = siim
    rows = read_rows(root / "train_image_level.csv")
    write_csv(root / "train_image_level.csv", ["id", "boxes", "labels", "StudyInstanceUID"], rows[1:])
    with pytest.raises(DataError, match=r"train_image_level.csv: missing column\(s\) 'label'"):
        source(root, tmp_path)


def test_wrong_options_get_specific_errors(siim, tmp_path):
    root, _ = siim
    with pytest.raises(ValueError, match="on_bad_sample must be 'error' or 'skip', got 'ignore'"):
        source(root, tmp_path, on_bad_sample="ignore")
    with pytest.raises(ValueError, match="image_size must be at least 8"):
        source(root, tmp_path, image_size=4)
    with pytest.raises(ValueError, match="image_size must be at most 4096"):
        source(root, tmp_path, image_size=65536)
    with pytest.raises(ValueError, match="is not a directory"):
        source(tmp_path / "nowhere", tmp_path)
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        source(root, tmp_path).split("validation")


# -- the cache -------------------------------------------------------------------------------------


def counting(limit: int | None = None):
    """A decoder that counts its calls and is interrupted after ``limit`` of them."""
    calls = []

    def decode(path):
        if limit is not None and len(calls) == limit:
            raise KeyboardInterrupt
        calls.append(Path(path).name)
        return read_image(path)

    return decode, calls


def test_cache_decodes_once_resumes_and_redoes_only_changed_files(siim, tmp_path):
    root, expected = siim
    images = {image: next(root.glob(f"train/*/*/{image}.dcm")) for image in expected}
    directory = tmp_path / "cache"

    decode, calls = counting(limit=5)
    with pytest.raises(KeyboardInterrupt):
        build_cache(directory, images, 32, workers=1, decode=decode, flush_every=2, progress=False)
    assert len(calls) == 5

    decode, calls = counting()
    resumed = build_cache(directory, images, 32, workers=1, decode=decode, progress=False)
    assert len(calls) == len(images) - 5 and (resumed.decoded, resumed.reused) == (len(images) - 5, 5)

    again = build_cache(directory, images, 32, workers=1, decode=decode, progress=False)
    assert again.decoded == 0 and len(calls) == len(images) - 5

    edited = images["s1i0"]
    write_dicom(edited, radiograph(0, boxed=False), bits_stored=12)  # new content, size or mtime
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    rebuilt = build_cache(directory, images, 32, workers=2, progress=False)  # the worker-pool path
    assert rebuilt.decoded == 1 and rebuilt.reused == len(images) - 1
    cached = np.load(rebuilt.array, mmap_mode="r")
    np.testing.assert_array_equal(cached[rebuilt.slots["s1i0"]], decode_to_cache(edited, 32)[0])

    del images["s9i0"]  # a different set of images: a new array, nothing decoded
    smaller = build_cache(directory, images, 32, workers=1, decode=decode, progress=False)
    assert smaller.decoded == 0 and len(list(directory.glob("images-*.npy"))) == 1


def test_second_source_reuses_the_cache(siim, tmp_path):
    root, expected = siim
    first = source(root, tmp_path)
    assert first.prepare().decoded == len(expected)
    second = source(root, tmp_path).prepare()
    assert second.decoded == 0 and second.reused == len(expected)
    assert source(root, tmp_path, image_size=48).cache_path != first.cache_path


# -- the plugin ------------------------------------------------------------------------------------


def test_registered_factories():
    factories = corex_cxr.corex_datasets()
    assert factories == {"siim": corex_cxr.siim_source, "folder": corex_cxr.folder_source, "phantom": corex_cxr.phantom_source,
                         "nih_cxr14": corex_cxr.nih_source, "chexpert": corex_cxr.chexpert_source}
    assert corex_cxr.SiimSource is SiimSource  # the public name still resolves, lazily


@pytest.mark.parametrize(("factory", "implementation"), [("siim_source", "corex_cxr.siim.SiimSource"),
                                                         ("folder_source", "corex_cxr.folder.FolderSource"),
                                                         ("phantom_source", "corex_cxr.phantom.phantom_siim_source"),
                                                         ("nih_source", "corex_cxr.nih.NihSource"),
                                                         ("chexpert_source", "corex_cxr.chexpert.ChexpertSource")])
def test_each_factory_mirrors_its_implementations_signature(factory, implementation):
    module, name = implementation.rsplit(".", 1)
    assert_mirrors(getattr(corex_cxr, factory), getattr(importlib.import_module(module), name))


def test_phantom_factory_writes_once_and_reads_it_with_the_siim_loader(tmp_path):
    data = corex_cxr.phantom_source(image_size=32, seed=0, cache_dir=tmp_path, studies=12, workers=1)
    assert isinstance(data, SiimSource)
    (root,) = (tmp_path / "phantom").iterdir()
    assert "64px" in root.name  # written at twice the working size
    summary = data.describe()
    assert sum(summary[s]["studies"] for s in ("train", "val", "test")) == 12
    item = data.split("train")[0]
    assert item["image"].shape == (1, 32, 32) and 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    mtime = (root / "train_image_level.csv").stat().st_mtime_ns
    corex_cxr.phantom_source(image_size=32, seed=0, cache_dir=tmp_path, studies=12, workers=1)
    assert (root / "train_image_level.csv").stat().st_mtime_ns == mtime


# -- the command line: bad data ends in a message, never a traceback --------------------------------


def siim_recipe(root: Path, tmp_path: Path, name: str = "siim", **data_options) -> Path:
    """A tiny recipe over the SIIM layout at ``root`` (decoding in this process by default)."""
    recipe = {
        "name": "siim-tiny",
        "data": {"name": name, "root": str(root), "image_size": 32, "batch_size": 4,
                 "cache_dir": str(tmp_path / "cache"), "workers": 1, **data_options},
        "model": {"encoder": {"name": "resnet18", "width": 4}},
        "stages": {"train": {"kind": "train", "epochs": 1, "heads": {"classification": {}}}},
    }
    path = tmp_path / "siim.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def without_pixel_data(path: Path) -> None:
    dataset = pydicom.dcmread(path)
    del dataset.PixelData
    dataset.save_as(path)


@pytest.mark.parametrize("damage", ["truncated", "no_pixel_data"])
@pytest.mark.parametrize("command", ["prepare", "run"])
def test_a_bad_dicom_is_a_message_in_prepare_and_run(siim, tmp_path, corex_cli, damage, command):
    root, _ = siim
    path = root / "train" / "s3" / "series0" / "s3i0.dcm"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-2000])  # the header still reads: found while decoding
    else:
        without_pixel_data(path)
    recipe = siim_recipe(root, tmp_path)
    args = ("data", "prepare", recipe) if command == "prepare" else ("run", recipe, "--out", tmp_path / "run", "--no-progress")
    code, _, err = corex_cli(*args)
    assert code == 2, err
    assert "Traceback" not in err
    assert str(path) in err and ("pixel data" in err)
    assert "on_bad_sample: skip" in err


def test_data_error_is_the_cores_user_error():
    from corex.errors import CorexError

    assert issubclass(DataError, CorexError) and issubclass(DataError, ValueError)


def damage_two_files(root: Path) -> list[Path]:
    truncated = root / "train" / "s3" / "series0" / "s3i0.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-2000])
    empty = root / "train" / "s5" / "series0" / "s5i0.dcm"
    without_pixel_data(empty)
    return [truncated, empty]


def test_prepare_says_what_it_decoded_reused_and_skipped_and_where_the_list_is(siim, tmp_path, corex_cli):
    root, expected = siim
    bad = damage_two_files(root)
    recipe = siim_recipe(root, tmp_path, on_bad_sample="skip")
    code, _, err = corex_cli("data", "prepare", recipe)
    assert code == 0, err
    good = len(expected) - 2
    (cache,) = (tmp_path / "cache" / "corex_cxr").iterdir()
    listing = cache / "skipped.json"
    assert f"siim: {good} images decoded, 0 reused from the cache, 2 skipped" in err
    assert f"the list is in {listing}" in err and f"cache: {cache}" in err
    assert sorted(entry["path"] for entry in json.loads(listing.read_text())["skipped"]) == sorted(map(str, bad))

    code, _, err = corex_cli("data", "prepare", recipe)  # everything known now: nothing decoded again
    assert code == 0 and f"siim: 0 images decoded, {good} reused from the cache, 2 skipped" in err


def test_info_counts_undecodable_images_once_the_cache_knows_them(siim, tmp_path, corex_cli):
    root, expected = siim
    damage_two_files(root)
    recipe = siim_recipe(root, tmp_path, on_bad_sample="skip")
    code, out, _ = corex_cli("data", "info", recipe, "--json")
    assert code == 0
    before = json.loads(out)["unusable"]
    assert (before["undecodable"], before["not_checked"], before["images"]) == (0, len(expected), len(expected))
    assert "not checked yet (only decoding tells" in before["note"]

    assert corex_cli("data", "prepare", recipe)[0] == 0
    after = json.loads(corex_cli("data", "info", recipe, "--json")[1])["unusable"]
    assert (after["undecodable"], after["not_checked"]) == (2, 0)
    assert after["note"].startswith("images that cannot be decoded: 2 (every image checked")


SLOW_PLUGIN = '''
import time

from corex import hookimpl
from corex_cxr.images import read_image
from corex_cxr.siim import SiimSource


def slow_read(path):
    time.sleep(0.5)
    return read_image(path)


class SlowSiim(SiimSource):
    decoder = staticmethod(slow_read)


@hookimpl
def corex_datasets():
    return {"slow_siim": SlowSiim}
'''


def children_of(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.add(int(status.parent.name))
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a dead child nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_decode_workers_die_with_a_killed_prepare(siim, tmp_path):
    root, _ = siim
    (tmp_path / "corex_slow_data.py").write_text(SLOW_PLUGIN)
    recipe = siim_recipe(root, tmp_path, name="slow_siim", workers=2)
    env = {**os.environ, "COREX_PLUGINS": "corex_slow_data",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "corex.cli", "data", "prepare", str(recipe)]
    prepare = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and prepare.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = children_of(prepare.pid)
        assert len(workers) >= 2, f"no decode workers appeared: {prepare.stderr.read().decode()[-2000:]}"
        os.kill(prepare.pid, signal.SIGKILL)
        prepare.wait()
        deadline = time.monotonic() + 5
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if running(pid)], "decode workers outlived the killed prepare"
    finally:
        prepare.kill()
        for pid in workers:  # only the workers this test started, if the fix failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_cache_the_disk_cannot_hold_is_refused_before_it_is_created(siim, tmp_path, monkeypatch):
    import shutil

    import corex_cxr.cache

    root, expected = siim
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(corex_cxr.cache.shutil, "disk_usage", lambda path: real._replace(free=500))
    data = source(root, tmp_path)
    with pytest.raises(DataError, match=rf"the decoded cache of {len(expected)} images at 32 px needs 28.7 kB, but only 500 bytes are free"):
        data.prepare()
    assert not list(data.cache_path.glob("images-*.npy"))


def test_phantom_options_are_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="val_fraction must be in"):
        corex_cxr.phantom_source(image_size=32, seed=0, cache_dir=tmp_path, studies=12, val_fraction=float("nan"))
    assert not (tmp_path / "phantom").exists()
