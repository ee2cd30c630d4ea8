"""NIH ChestX-ray14 (Wang et al., CVPR 2017): frontal PNGs with 14 findings mined from reports.

Layout under ``root``, as NIH distributes it::

    Data_Entry_2017.csv   Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age,
                          Patient Gender, View Position, ...
    images/<Image Index>  the PNGs (the archives unpack to images/; images_001/images/ ... as on
                          Kaggle are found too)
    train_val_list.txt    the official split, one Image Index per line (optional)
    test_list.txt

Choices (see also docs/data.md):

* ``Finding Labels`` is pipe-separated ("Cardiomegaly|Effusion") or "No Finding"; the target is 1
  for each finding named, 0 for the others (:data:`LABELS` order). NIH's labels carry no
  uncertainty, so no target is -1.
* Each image is its own study (study id = Image Index); the patient is ``Patient ID``.
* With both lists, ``test`` is every patient with an image in ``test_list.txt`` (the lists are
  patient-disjoint) and ``val`` is carved by patient from the rest with ``val_fraction`` (or
  ``folds``/``fold``); ``test_fraction`` is unused. An image in neither list goes with train_val.
  Without the lists, patient-grouped splits as for every source.
* ``meta`` from the CSV: sex, age band and view; the other fields are unknown.
* Each of these is a problem naming the CSV line or file: an empty Image Index or Patient ID, an
  image listed again, an unknown finding, "No Finding" together with a finding, a row whose
  file is not on disk. PNGs that the CSV does not name are ignored and counted in
  ``describe()["unreferenced_images"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corex_cxr.metadata import Meta, age_band, parse_sex, years
from corex_cxr.siim import read_csv
from corex_cxr.source import BadSamplePolicy, CxrSource, Sample
from corex_cxr.splits import UNLABELLED

LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
CSV = "Data_Entry_2017.csv"
COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"


class NihSource(CxrSource):
    """NIH ChestX-ray14's 14 findings, multi-label (``data: nih_cxr14``).

    Building reads the CSV and lists the image folders, never pixels. Options: ``root``, and those
    of :class:`~corex_cxr.siim.SiimSource`.
    """

    multilabel = True

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
            name="nih_cxr14",
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
            class_names=LABELS,
        )
        samples, problems, self.unreferenced_images = scan_nih(root)
        self.official_split = (root / TRAIN_VAL_LIST).is_file() and (root / TEST_LIST).is_file()
        fixed = None
        if self.official_split:
            test_images = set(read_list(root / TEST_LIST))
            fixed = {sample.patient_id: "test" for sample in samples if sample.image_id in test_images}
        self._accept(samples, problems, fixed)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "unreferenced_images": self.unreferenced_images,
                "official_split": self.official_split}


def scan_nih(root: Path) -> tuple[list[Sample], list[dict[str, Any]], int]:
    """Read the CSV into samples, problems and the number of PNGs it does not name."""
    csv_path = root / CSV
    files = index_images(root)
    samples: list[Sample] = []
    problems: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    for line, row in read_csv(csv_path, COLUMNS):
        image_id = row["Image Index"].strip()
        try:
            if image_id in first_line:
                raise ValueError(f"image listed again (first on line {first_line[image_id]})")
            first_line[image_id] = line
            patient_id, labels, meta = _parse_row(row)
        except ValueError as error:
            problems.append({"path": str(csv_path), "reason": f"line {line} ({image_id!r}): {error}"})
            continue
        if image_id not in files:
            reason = f"file listed on line {line} of {CSV} is not in images/"
            problems.append({"path": str(root / "images" / image_id), "reason": reason})
            continue
        samples.append(Sample(image_id, image_id, patient_id, files[image_id], UNLABELLED, False, (), meta, labels))
    return samples, problems, len(set(files) - set(first_line))


def _parse_row(row: dict[str, str]) -> tuple[str, tuple[float, ...], Meta]:
    """The patient, target and metadata of one CSV row; ``ValueError`` if malformed."""
    if not row["Image Index"].strip():
        raise ValueError("empty Image Index")
    patient_id = row["Patient ID"].strip()
    if not patient_id:
        raise ValueError("empty Patient ID")
    meta = Meta(
        sex=parse_sex(row.get("Patient Gender", "")),
        age_band=age_band(years(row.get("Patient Age", "").strip())),
        view=row.get("View Position", "").strip().upper(),
    )
    return patient_id, parse_findings(row["Finding Labels"]), meta


def parse_findings(text: str) -> tuple[float, ...]:
    """``"Cardiomegaly|Effusion"`` or ``"No Finding"`` to one 1.0 or 0.0 per label of :data:`LABELS`."""
    names = [name.strip() for name in text.split("|") if name.strip()]
    if not names:
        raise ValueError("empty Finding Labels")
    if NO_FINDING in names:
        if len(names) > 1:
            raise ValueError(f"{NO_FINDING!r} together with findings in {text!r}")
        return (0.0,) * len(LABELS)
    unknown = [name for name in names if name not in LABELS]
    if unknown:
        expected = f"{', '.join(LABELS)} or {NO_FINDING}"
        raise ValueError(f"unknown finding(s) {', '.join(map(repr, unknown))} (expected {expected})")
    return tuple(float(label in names) for label in LABELS)


def index_images(root: Path) -> dict[str, Path]:
    """File name -> path for every PNG under ``images/`` and ``images_*/images/``."""
    files: dict[str, Path] = {}
    for folder in [root / "images", *sorted(root.glob("images_*/images"))]:
        for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
            files.setdefault(path.name, path)
    return files


def read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


__all__ = ["LABELS", "NihSource"]
