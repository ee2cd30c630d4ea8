"""The SIIM-FISABIO-RSNA COVID-19 Detection data (Kaggle 2021), as used by the paper.

Layout under ``root``::

    train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    train_study_level.csv   id = "<study>_study", one-hot: Negative for Pneumonia, Typical
                            Appearance, Indeterminate Appearance, Atypical Appearance
    train_image_level.csv   id = "<SOPInstanceUID>_image", boxes (a Python-literal list of
                            {'x', 'y', 'width', 'height'} in original pixels, or empty/NaN),
                            label ("opacity 1 xmin ymin xmax ymax" repeated, or "none 1 0 0 1 1"),
                            StudyInstanceUID

Choices (see also docs/data.md):

* Every image of a study gets the study's label ("Training uses every image of a study"); the
  evaluators average image probabilities per ``study_id`` for study-level figures.
* The mask is the union of an image's boxes. It counts as a real annotation (``has_mask``) when
  the image has boxes or its study is negative (an empty mask: no opacity). An image of a positive
  study without boxes (usually a second image of a study whose other image was boxed) is
  unannotated: calling it "no opacity" would teach the segmentation head that a typical or
  atypical radiograph is clear.
* The patient is the DICOM PatientID (read from the header only), or the study id when absent.
  The same header gives the image's ``meta`` (:func:`corex_cxr.metadata.from_header`).
* DICOM files under ``train/`` that the image CSV does not name are ignored (there is no label for
  them); ``describe()["unreferenced_images"]`` counts them.
* Each of these is a problem naming the file or CSV line: a missing CSV column (fatal), a bad
  one-hot row, a malformed boxes or label entry, a row whose file is not on disk, a study with no
  image on disk, an image row of an unknown study, an unreadable DICOM header.
"""

from __future__ import annotations

import ast
import csv
import math
from pathlib import Path
from typing import Any

from corex_cxr.dicom import Box, read_header
from corex_cxr.errors import DataError
from corex_cxr.metadata import from_header
from corex_cxr.source import BadSamplePolicy, CxrSource, Sample

NEGATIVE = 0  # label index of "Negative for Pneumonia"
STUDY_CSV = "train_study_level.csv"
IMAGE_CSV = "train_image_level.csv"
CLASS_COLUMNS = ("Negative for Pneumonia", "Typical Appearance", "Indeterminate Appearance", "Atypical Appearance")
IMAGE_COLUMNS = ("id", "boxes", "label", "StudyInstanceUID")


class SiimSource(CxrSource):
    """SIIM-FISABIO-RSNA study-level classes and opacity boxes (``data: siim``).

    Building reads the two CSVs and every DICOM header, never pixels; pixels are decoded once, at
    ``image_size``, into ``cache_dir`` by ``prepare()`` or the first ``split()``.
    Options: ``root``; ``on_bad_sample`` ("error": one error listing every problem, "skip": drop
    and report them); the split options of :mod:`corex_cxr.splits` (``val_fraction`` 0.15,
    ``test_fraction`` 0.15, ``folds`` 0, ``fold`` 0); ``workers`` decoding processes (0 = one per CPU).
    """

    def __init__(
        self,
        *,
        root: Path,
        image_size: int,
        seed: int = 0,
        cache_dir: Path,
        on_bad_sample: BadSamplePolicy = "error",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        folds: int = 0,
        fold: int = 0,
        workers: int = 0,
    ):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ValueError(f"root {str(root)!r} is not a directory.")
        super().__init__(
            name="siim",
            location=root,
            image_size=image_size,
            seed=seed,
            cache_dir=cache_dir,
            on_bad_sample=on_bad_sample,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            folds=folds,
            fold=fold,
            workers=workers,
        )
        samples, problems, self.unreferenced_images = scan_siim(root)
        self._accept(samples, problems)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "unreferenced_images": self.unreferenced_images}


def scan_siim(root: Path) -> tuple[list[Sample], list[dict[str, Any]], int]:
    """Read the layout into samples, problems and the number of unreferenced DICOM files."""
    problems: list[dict[str, Any]] = []
    study_labels = _read_study_csv(root / STUDY_CSV, problems)
    files, duplicates = _index_files(root / "train")
    problems += [{"path": str(path), "reason": "another file has the same SOPInstanceUID"} for path in duplicates]

    image_csv = root / IMAGE_CSV
    samples: list[Sample] = []
    referenced: set[str] = set()
    studies_on_disk: set[str] = set()
    for line, row in read_csv(image_csv, IMAGE_COLUMNS):
        image_id, study_id = row["id"].removesuffix("_image"), row["StudyInstanceUID"].strip()
        repeated = image_id in referenced
        referenced.add(image_id)
        if image_id in files:
            studies_on_disk.add(study_id)
        try:
            if repeated:
                raise ValueError("image listed again")
            samples.append(_image_sample(row, files.get(image_id), study_labels))
        except DataError as error:  # the DICOM file itself: the problem names it
            problems += error.problems
        except ValueError as error:  # the CSV row
            problems.append({"path": str(image_csv), "reason": f"line {line} (id {row['id']!r}): {error}"})

    for study_id, (_, line) in study_labels.items():
        if study_id not in studies_on_disk:
            reason = f"line {line}: no image of study {study_id!r} is both in {IMAGE_CSV} and on disk"
            problems.append({"path": str(root / STUDY_CSV), "reason": reason})
    return samples, problems, len(set(files) - referenced)


def _image_sample(row: dict[str, str], path: Path | None, study_labels: dict[str, tuple[int, int]]) -> Sample:
    """One image row as a sample; ``ValueError`` for a bad row, :class:`DataError` for a bad file."""
    image_id, study_id = row["id"].removesuffix("_image"), row["StudyInstanceUID"].strip()
    if not row["id"].endswith("_image"):
        raise ValueError("id does not end in '_image'")
    if study_id not in study_labels:
        raise ValueError(f"StudyInstanceUID {study_id!r} is not in {STUDY_CSV}")
    boxes, opacities = parse_boxes(row["boxes"]), parse_label(row["label"])
    if len(opacities) != len(boxes):
        raise ValueError(f"boxes has {len(boxes)} box(es) but label has {len(opacities)} opacity entries")
    if path is None:
        raise ValueError(f"no file train/{study_id}/*/{image_id}.dcm on disk")
    if path.parent.parent.name != study_id:
        raise ValueError(f"the file is under study folder {path.parent.parent.name!r}, not {study_id!r}")
    header = read_header(path)
    patient_id = str(header.get("PatientID", "") or "").strip() or study_id
    label, _ = study_labels[study_id]
    annotated = bool(boxes) or label == NEGATIVE
    return Sample(image_id, study_id, patient_id, path, label, annotated, tuple(boxes), from_header(header))


def parse_boxes(text: str) -> list[Box]:
    """The ``boxes`` column: ``[{'x': .., 'y': .., 'width': .., 'height': ..}, ...]``, empty or NaN."""
    text = (text or "").strip()
    if text.lower() in ("", "nan", "[]"):
        return []
    try:
        entries = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"malformed boxes {_short(text)}: not a Python-literal list") from None
    if isinstance(entries, dict):
        entries = [entries]
    boxes = []
    for entry in entries if isinstance(entries, (list, tuple)) else [None]:
        try:
            box = tuple(float(entry[key]) for key in ("x", "y", "width", "height"))
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"malformed boxes {_short(text)}: expected dicts with x, y, width, height") from None
        if not all(map(math.isfinite, box)) or box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"malformed boxes {_short(text)}: a box needs finite values and positive size")
        boxes.append(box)
    return boxes


def parse_label(text: str) -> list[Box]:
    """The ``label`` column: ``opacity 1 xmin ymin xmax ymax`` repeated, or ``none 1 0 0 1 1``.

    Returns the opacity boxes as ``(x, y, width, height)``, for cross-checking the ``boxes`` column.
    """
    tokens = (text or "").split()
    if not tokens or len(tokens) % 6:
        raise ValueError(f"malformed label {_short(text)}: expected groups of 'class confidence x0 y0 x1 y1'")
    opacities = []
    for start in range(0, len(tokens), 6):
        name, *numbers = tokens[start : start + 6]
        try:
            _, x0, y0, x1, y1 = map(float, numbers)
        except ValueError:
            raise ValueError(f"malformed label {_short(text)}: non-numeric coordinates") from None
        if name == "opacity":
            opacities.append((x0, y0, x1 - x0, y1 - y0))
        elif name != "none":
            raise ValueError(f"malformed label {_short(text)}: unknown class {name!r} (expected opacity or none)")
    return opacities


def _read_study_csv(path: Path, problems: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Study id -> (class index, CSV line); bad rows go to ``problems``."""
    labels: dict[str, tuple[int, int]] = {}
    for line, row in read_csv(path, ("id", *CLASS_COLUMNS)):
        where = f"line {line} (id {row['id']!r})"
        study_id = row["id"].removesuffix("_study")
        if not row["id"].endswith("_study"):
            reason = "id does not end in '_study'"
        elif study_id in labels:
            reason = f"study listed again (first on line {labels[study_id][1]})"
        else:
            values = [row[column].strip() for column in CLASS_COLUMNS]
            ones = [index for index, value in enumerate(values) if _is_one(value)]
            if len(ones) == 1 and all(_is_one(v) or _is_zero(v) for v in values):
                labels[study_id] = (ones[0], line)
                continue
            reason = f"expected exactly one 1 among the four class columns, got {values}"
        problems.append({"path": str(path), "reason": f"{where}: {reason}"})
    return labels


def read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows with their line numbers; a missing file or column is fatal (a :class:`DataError`)."""
    if not path.is_file():
        raise DataError(path, "CSV file does not exist")
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        missing = [column for column in columns if column not in (reader.fieldnames or [])]
        if missing:
            raise DataError(path, f"missing column(s) {', '.join(map(repr, missing))} in the header")
        return [(reader.line_num, {k: v or "" for k, v in row.items() if k is not None}) for row in reader]


def _index_files(folder: Path) -> tuple[dict[str, Path], list[Path]]:
    """SOPInstanceUID (file stem) -> path for every ``.dcm`` under ``folder``, and duplicates."""
    files: dict[str, Path] = {}
    duplicates: list[Path] = []
    for path in sorted(folder.rglob("*.dcm")) if folder.is_dir() else []:
        if path.stem in files:
            duplicates.append(path)
        else:
            files[path.stem] = path
    return files, duplicates


def _is_one(value: str) -> bool:
    return value in ("1", "1.0")


def _is_zero(value: str) -> bool:
    return value in ("0", "0.0")


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
