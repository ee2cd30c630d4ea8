"""A folder of PNG, JPEG or DICOM images with a CSV of labels (``data: folder``), or without one.

Without ``csv`` every image under ``root`` (searched recursively: .png, .jpg, .jpeg, .dcm) is one
unlabelled study of its own: a corpus for self-supervised pre-training (set ``val_fraction: 0`` and
``test_fraction: 0`` to pre-train on all of it).

One CSV row per image, or several when each row carries one box::

    path,label,x,y,width,height,patient
    a.png,typical,10,20,30,40,p1
    a.png,typical,60,20,30,40,p1
    b.dcm,negative,,,,,p2

Labels are class names (case-insensitive) or class indices; an empty label means unlabelled
(``-1``). Boxes come from ``box_columns`` (x, y, width, height, several rows per image) or a
``boxes_column`` in the SIIM literal format; when either is set every image has a real mask (empty
when it has no box), otherwise none has. The study defaults to the image, the patient to the study.
Images are decoded by :func:`corex_cxr.images.read_image`; the cache, splits and bad-data handling
are those of every corex_cxr source (:mod:`corex_cxr.source`).

Metadata (``meta``, :mod:`corex_cxr.metadata`): optional CSV columns ``sex``, ``age`` (years),
``view``, ``manufacturer``, ``modality``, ``portable`` and ``body_part``, and for DICOM files their
headers (read without pixels) for whatever the CSV leaves empty. A header that cannot be read gives
empty fields here; decoding reports the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corex_cxr.dicom import Box, read_header
from corex_cxr.errors import DataError, printable
from corex_cxr.images import PICTURE_SUFFIXES
from corex_cxr.metadata import Meta, from_columns, from_header
from corex_cxr.siim import parse_boxes, read_csv
from corex_cxr.source import CLASS_NAMES, BadSamplePolicy, CxrSource, Sample
from corex_cxr.splits import UNLABELLED


class FolderSource(CxrSource):
    """Images under ``root`` listed in ``csv`` (a path relative to ``root`` is allowed).

    Options: ``image_column`` ("path"), ``label_column`` ("label"), ``classes`` (default: negative,
    typical, indeterminate, atypical), ``box_columns`` or ``boxes_column``, ``study_column``,
    ``patient_column``, plus those of :class:`~corex_cxr.siim.SiimSource`.
    """

    def __init__(
        self,
        *,
        root: Path,
        csv: Path | None = None,
        image_size: int,
        seed: int = 0,
        cache_dir: Path,
        image_column: str = "path",
        label_column: str = "label",
        classes: list[str] | None = None,
        box_columns: list[str] | None = None,
        boxes_column: str | None = None,
        study_column: str | None = None,
        patient_column: str | None = None,
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
        csv_path = Path(csv).expanduser() if csv is not None else None
        if csv_path is not None and not csv_path.is_absolute() and (root / csv_path).is_file():
            csv_path = root / csv_path
        class_names = tuple(classes) if classes is not None else CLASS_NAMES
        if not class_names or len(set(class_names)) != len(class_names):
            raise ValueError(f"classes must be distinct names, got {list(class_names)}.")
        if box_columns is not None and len(box_columns) != 4:
            raise ValueError(f"box_columns must name 4 columns (x, y, width, height), got {box_columns}.")
        if box_columns is not None and boxes_column is not None:
            raise ValueError("set box_columns or boxes_column, not both.")
        columns = {
            "image": image_column,
            "label": label_column,
            "study": study_column,
            "patient": patient_column,
            "boxes": boxes_column,
        }
        super().__init__(
            name="folder",
            location=csv_path or root,
            image_size=image_size,
            seed=seed,
            cache_dir=cache_dir,
            on_bad_sample=on_bad_sample,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            folds=folds,
            fold=fold,
            workers=workers,
            class_names=class_names,
        )
        if csv_path is None:
            self._accept(*unlabelled_images(root))
        else:
            self._accept(*scan_folder(root, csv_path, columns, box_columns, class_names))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


def unlabelled_images(root: Path) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Every image file under ``root`` as an unlabelled study of its own; no pixel is read.

    The image id is the path relative to ``root`` as :func:`~corex_cxr.errors.printable` text, so a
    name that is not valid UTF-8 (``scan\\xff.png``) travels through the cache, the batches and every
    file written about it; two files whose ids would be the same are a problem (the second is named).
    """
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"root {printable(root)!r} holds no .png, .jpg, .jpeg or .dcm file (searched recursively).")
    samples, problems, seen = [], [], {}
    for path in paths:
        image_id = printable(path.relative_to(root).as_posix())
        if image_id in seen:
            problems.append({"path": printable(path), "reason": f"its name reads {image_id!r} as text, as that of "
                             f"{printable(seen[image_id])} does (a name that is not valid UTF-8?); rename one of them"})
            continue
        seen[image_id] = path
        samples.append(Sample(image_id, image_id, image_id, path, UNLABELLED, False, (), header_meta(path)))
    return samples, problems


def header_meta(path: Path) -> Meta:
    """A DICOM file's metadata from its header; empty for PNG/JPEG or an unreadable header."""
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return Meta()
    try:
        return from_header(read_header(path))
    except DataError:  # decoding reports the file, as it did before headers were read
        return Meta()


def scan_folder(
    root: Path,
    csv_path: Path,
    columns: dict[str, str | None],
    box_columns: list[str] | None,
    class_names: tuple[str, ...],
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Read the CSV into samples (rows of one image merged) and problems; no pixel is read."""
    has_boxes = box_columns is not None or columns["boxes"] is not None
    wanted = tuple(c for c in (*columns.values(), *(box_columns or [])) if c is not None)
    rows = read_csv(csv_path, wanted)

    problems: list[dict[str, Any]] = []
    merged: dict[str, dict[str, Any]] = {}  # image id -> fields, boxes, first line
    bad_images: set[str] = set()
    for line, row in rows:
        image_id = Path(row[columns["image"]].strip()).as_posix()
        try:
            fields, boxes = _parse_row(row, image_id, columns, box_columns, class_names)
            if image_id in merged and merged[image_id]["fields"] != fields:
                first = merged[image_id]["line"]
                raise ValueError(f"label, study or patient differs from line {first} for the same image")
        except ValueError as error:
            problems.append({"path": printable(csv_path), "reason": f"line {line} ({image_id!r}): {error}"})
            bad_images.add(image_id)
            continue
        entry = merged.setdefault(image_id, {"fields": fields, "boxes": [], "line": line, "meta": from_columns(row)})
        entry["boxes"] += boxes

    samples = []
    for image_id, entry in merged.items():
        if image_id in bad_images:
            continue
        path = Path(image_id) if Path(image_id).is_absolute() else root / image_id
        if not path.is_file():
            reason = f"file listed on line {entry['line']} of {csv_path.name} does not exist"
            problems.append({"path": printable(path), "reason": reason})
            continue
        label, study, patient = entry["fields"]
        meta = entry["meta"].merged(header_meta(path))
        samples.append(Sample(image_id, study, patient, path, label, has_boxes, tuple(entry["boxes"]), meta))
    return samples, problems


def _parse_row(
    row: dict[str, str],
    image_id: str,
    columns: dict[str, str | None],
    box_columns: list[str] | None,
    class_names: tuple[str, ...],
) -> tuple[tuple[int, str, str], list[Box]]:
    """``(label, study, patient)`` and the boxes of one row; ``ValueError`` if malformed."""
    if image_id in ("", "."):
        raise ValueError(f"empty {columns['image']!r}")
    label = _parse_label(row[columns["label"]], class_names)
    boxes = _row_boxes(row, box_columns, columns["boxes"])
    study = (row[columns["study"]].strip() if columns["study"] else "") or image_id
    patient = (row[columns["patient"]].strip() if columns["patient"] else "") or study
    return (label, study, patient), boxes


def _parse_label(text: str, class_names: tuple[str, ...]) -> int:
    text = text.strip()
    if not text:
        return UNLABELLED
    lowered = [name.lower() for name in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    names = ", ".join(class_names)
    raise ValueError(f"label {text!r} is neither a class name ({names}) nor an index below {len(class_names)}")


def _row_boxes(row: dict[str, str], box_columns: list[str] | None, boxes_column: str | None) -> list[Box]:
    if boxes_column is not None:
        return parse_boxes(row[boxes_column])
    if box_columns is None:
        return []
    values = [row[column].strip() for column in box_columns]
    if not any(values):
        return []  # a row without a box: the image's real, empty annotation
    try:
        x, y, width, height = map(float, values)
    except ValueError:
        raise ValueError(f"box columns {box_columns} hold {values}, not four numbers") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"box {values} needs a positive width and height")
    return [(x, y, width, height)]
