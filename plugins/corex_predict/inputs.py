"""New radiographs in, model-ready tensors out, decoded exactly as the training cache decodes them.

Decoding is the data plugin's own (:func:`corex_cxr.cache.decode_to_cache`): DICOM modality and
VOI LUTs, MONOCHROME1 inverted, compressed transfer syntaxes, PNG/JPEG divided by their full
scale; then resized and padded to the model's ``image_size`` and quantised to uint16 as in the
cache, so a file gives the model the very tensor it would have seen in training.

Studies: a DICOM file's StudyInstanceUID, unless a ``--study-csv`` names the file's study; a
picture (PNG/JPEG) without one is a study of its own.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from corex_cxr import (
    FULL_SCALE,
    PICTURE_SUFFIXES,
    DataError,
    decode_to_cache,
    read_header,
    read_image,
)
from torch.utils.data import Dataset

from corex.errors import CorexError
from corex_predict.gate import header_fields

# What a folder walk picks up; a file named on the command line is tried whatever its suffix.
IMAGE_SUFFIXES = (".dcm", ".dicom", *PICTURE_SUFFIXES)
FILE_COLUMNS = ("path", "file", "image", "image_path", "filename", "file_name")
STUDY_COLUMNS = ("study", "study_id", "studyinstanceuid", "study_uid", "study_instance_uid")


def display_name(path: str | Path) -> str:
    """``path`` as text that every file, terminal and JSON reader takes: a name whose bytes are not
    valid UTF-8 (``b"scan\\xff.png"``, read by Python as a lone surrogate) shows them escaped
    (``scan\\xff.png``); a valid name is unchanged."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def find_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files to predict (folders walked recursively for image suffixes, sorted) and the inputs
    that do not exist, as ``{"file", "reason"}``."""
    files: list[Path] = []
    missing: list[dict[str, str]] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            missing.append({"file": display_name(path), "reason": "does not exist"})
    unique = list(dict.fromkeys(files))  # a file named twice is predicted once
    return unique, missing


def read_study_csv(path: str | Path) -> dict[str, str]:
    """``{resolved file path: study id}`` from a CSV with a file column and a study column
    (names in :data:`FILE_COLUMNS` / :data:`STUDY_COLUMNS`, any case); relative paths are taken
    relative to the CSV's folder. Also keyed by bare file name, for files named differently."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorexError(f"--study-csv: '{path}' does not exist")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = {name.strip().lower(): name for name in (reader.fieldnames or [])}
        file_column = next((header[c] for c in FILE_COLUMNS if c in header), None)
        study_column = next((header[c] for c in STUDY_COLUMNS if c in header), None)
        if file_column is None or study_column is None:
            raise CorexError(
                f"--study-csv: '{path}' needs a file column ({', '.join(FILE_COLUMNS)}) and a study column "
                f"({', '.join(STUDY_COLUMNS)}); its columns are {', '.join(reader.fieldnames or []) or 'none'}"
            )
        studies: dict[str, str] = {}
        names: dict[str, set[str]] = {}
        for line, row in enumerate(reader, start=2):
            name, study = (row.get(file_column) or "").strip(), (row.get(study_column) or "").strip()
            if not name or not study:
                raise CorexError(f"--study-csv: '{path}' line {line}: empty {file_column!r} or {study_column!r}")
            file = Path(name).expanduser()
            file = file if file.is_absolute() else path.parent / file
            studies[str(file.resolve())] = study
            names.setdefault(file.name, set()).add(study)
    for name, found in names.items():
        if len(found) == 1:  # a bare name is only a key when it means one study
            studies.setdefault(name, next(iter(found)))
    return studies


def study_of(path: Path, studies: Mapping[str, str]) -> str | None:
    return studies.get(str(path.resolve())) or studies.get(path.name)


class ImageFiles(Dataset):
    """Decodes one file per item; a file that cannot be read becomes an item with its ``error``."""

    def __init__(self, files: Sequence[Path], image_size: int, studies: Mapping[str, str] | None = None):
        self.files, self.image_size, self.studies = list(files), image_size, dict(studies or {})

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        item: dict[str, Any] = {"index": index, "file": display_name(path)}
        header: dict[str, str] = {}
        try:
            study = study_of(path, self.studies)
            if path.suffix.lower() not in PICTURE_SUFFIXES:
                dataset = read_header(path)  # a cheap header read: the study and the gate's header checks
                header = header_fields(dataset)
                if study is None:
                    uid = dataset.get("StudyInstanceUID")
                    study = str(uid).strip() if uid else None
            pixels, geometry = decode_to_cache(path, self.image_size, read_image)
        except DataError as error:
            return {**item, "error": error.reason}
        except Exception as error:  # noqa: BLE001 -- one odd file must not stop a folder of thousands
            return {**item, "error": f"cannot be decoded ({type(error).__name__}: {error})"}
        # As the cache serves it: uint16 / 65535 in float32 (corex_cxr.cache.CachedImages).
        image = np.multiply(pixels, np.float32(1.0 / FULL_SCALE), dtype=np.float32)
        return {**item, "image": torch.from_numpy(image).unsqueeze(0), "study_id": display_name(study or path), "geometry": geometry,
                "header": header}


def collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep items as they are: the batch is stacked after the unreadable ones are set aside."""
    return items


def image_region(geometry: Mapping[str, Any], size: int) -> tuple[slice, slice]:
    """Rows and columns of the working square that hold the image (not the air padding),
    computed as :func:`corex_cxr.dicom.resize_pad` places it."""
    height, width = geometry["shape"]
    scale, (pad_x, pad_y) = geometry["scale"], geometry["pad"]
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return slice(pad_y, min(size, pad_y + new_h)), slice(pad_x, min(size, pad_x + new_w))
