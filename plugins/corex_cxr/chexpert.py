"""CheXpert (Irvin et al., AAAI 2019): radiographs with 14 observations labelled from reports,
uncertain ones included.

Layout, as ``CheXpert-v1.0.zip`` or ``CheXpert-v1.0-small.zip`` unpacks (``root`` is that folder)::

    train.csv   Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 observations of LABELS
    valid.csv   the same columns (optional)
    train/patient00001/study1/view1_frontal.jpg ...
    valid/patient64541/study1/view1_frontal.jpg ...

Choices (see also docs/data.md):

* ``Path`` ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg") is relative to
  the parent of ``root``; a path relative to ``root`` itself, or one whose first folder is named
  otherwise (a renamed ``root``), is found too. The image id is the path from its ``train/`` or
  ``valid/`` folder on, the same for the full and the small version.
* Observations: ``1.0`` positive, ``0.0`` negative, blank (not mentioned) 0, ``-1.0`` (uncertain)
  by ``uncertain``: ``ones`` 1, ``zeros`` 0, ``ignore`` -1 in the target (masked out of the loss).
* ``views``: ``frontal`` (default), ``lateral`` or ``all`` by the Frontal/Lateral column; the
  other rows are left out (``describe()["other_views"]`` counts them), not problems.
* The study is ``patientNNNNN/studyN`` and the patient ``patientNNNNN``, from the path.
* ``valid.csv`` is the official validation split: its patients are ``val``; ``test`` is carved by
  patient from train.csv with ``test_fraction`` and ``val_fraction`` is unused (so are ``folds``,
  which are refused). Without valid.csv, patient-grouped splits as for every source.
* ``meta``: sex, age band and view (the AP/PA column, else ``LATERAL`` for a lateral image).
* Each of these is a problem naming the CSV line or file: a path without patient and study
  folders, an image listed again, a label value other than 1, 0, -1 or blank, an unknown
  Frontal/Lateral value, a row whose file is not on disk.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from corex_cxr.metadata import Meta, age_band, parse_sex, years
from corex_cxr.options import UncertainPolicy, Views
from corex_cxr.siim import read_csv
from corex_cxr.source import BadSamplePolicy, CxrSource, Sample
from corex_cxr.splits import UNLABELLED

LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS)
TRAIN_CSV, VALID_CSV = "train.csv", "valid.csv"
UNCERTAIN = {"ones": 1.0, "zeros": 0.0, "ignore": -1.0}
VIEWS = {"frontal": ("Frontal",), "lateral": ("Lateral",), "all": ("Frontal", "Lateral")}
VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": 0.0}  # -1 by the uncertain policy
PATIENT, STUDY = re.compile(r"patient\d+"), re.compile(r"study\d+")


class ChexpertSource(CxrSource):
    """CheXpert's 14 observations, multi-label (``data: chexpert``).

    Building reads the CSVs and checks that each file exists, never pixels. Options: ``root``,
    ``uncertain`` (``ones``, ``zeros`` or ``ignore``; default ``ignore``), ``views`` (``frontal``,
    ``lateral`` or ``all``; default ``frontal``), and those of :class:`~corex_cxr.siim.SiimSource`.
    """

    multilabel = True

    def __init__(
        self,
        *,
        root: Path,
        image_size: int,
        seed: int = 0,
        cache_dir: Path,
        uncertain: UncertainPolicy = "ignore",
        views: Views = "frontal",
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
        if uncertain not in UNCERTAIN:
            raise ValueError(f"uncertain must be one of {', '.join(UNCERTAIN)}, got {uncertain!r}.")
        if views not in VIEWS:
            raise ValueError(f"views must be one of {', '.join(VIEWS)}, got {views!r}.")
        self.official_split = (root / VALID_CSV).is_file()
        if folds and self.official_split:
            raise ValueError("folds: chexpert's validation split is valid.csv; cross-validation is not offered.")
        super().__init__(
            name="chexpert",
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
            cache_variant=f"views={views}",
        )
        self.uncertain, self.views = uncertain, views
        scan = ChexpertScan(root, UNCERTAIN[uncertain], VIEWS[views])
        scan.read(root / TRAIN_CSV)
        valid = scan.read(root / VALID_CSV) if self.official_split else []
        self.other_views = scan.other_views
        fixed = {sample.patient_id: "val" for sample in valid}
        self._accept(scan.samples, scan.problems, fixed)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "official_split": self.official_split, "uncertain": self.uncertain,
                "views": self.views, "other_views": self.other_views}


class ChexpertScan:
    """Reads train.csv, then valid.csv, into one list of samples and problems; no pixel is read."""

    def __init__(self, root: Path, uncertain: float, views: tuple[str, ...]):
        self.root, self.uncertain, self.views = root, uncertain, views
        self.samples: list[Sample] = []
        self.problems: list[dict[str, Any]] = []
        self.other_views = 0
        self._first: dict[str, str] = {}  # image id -> where it was first listed

    def read(self, csv_path: Path) -> list[Sample]:
        """The samples of one CSV (also added to ``samples``)."""
        found = []
        for line, row in read_csv(csv_path, COLUMNS):
            try:
                view = row["Frontal/Lateral"].strip()
                if view not in ("Frontal", "Lateral"):
                    raise ValueError(f"Frontal/Lateral is {view!r}, not Frontal or Lateral")
                if view not in self.views:
                    self.other_views += 1
                    continue
                sample = self._sample(row, f"line {line} of {csv_path.name}")
            except ValueError as error:
                self.problems.append({"path": str(csv_path), "reason": f"line {line} ({row['Path']!r}): {error}"})
                continue
            if not sample.path.is_file():
                reason = f"file listed on line {line} of {csv_path.name} does not exist"
                self.problems.append({"path": str(sample.path), "reason": reason})
                continue
            found.append(sample)
        self.samples += found
        return found

    def _sample(self, row: dict[str, str], where: str) -> Sample:
        """One row as a sample; ``ValueError`` if malformed."""
        relative = PurePosixPath(row["Path"].strip())
        folders = [i for i, part in enumerate(relative.parts[:-2]) if PATIENT.fullmatch(part)]
        if not folders or not STUDY.fullmatch(relative.parts[folders[0] + 1]):
            raise ValueError("Path has no patientNNNNN/studyN/ folders")
        at = folders[0]
        patient, study = relative.parts[at], "/".join(relative.parts[at : at + 2])
        image_id = "/".join(relative.parts[max(at - 1, 0) :])  # from train/ or valid/ on
        if image_id in self._first:
            raise ValueError(f"image listed again (first on {self._first[image_id]})")
        self._first[image_id] = where
        labels = tuple(self._value(row[label], label) for label in LABELS)
        return Sample(image_id, study, patient, self._locate(relative), UNLABELLED, False, (), self._meta(row), labels)

    def _locate(self, relative: PurePosixPath) -> Path:
        """A Path value's file: relative to root's parent, to root, or below a first folder named
        otherwise (the first of these that exists; else the first, to be reported missing)."""
        candidates = [self.root.parent / relative, self.root / relative]
        if len(relative.parts) > 1:
            candidates.append(self.root.joinpath(*relative.parts[1:]))
        return next((path for path in candidates if path.is_file()), candidates[0])

    def _value(self, text: str, label: str) -> float:
        text = text.strip()
        if text in ("-1", "-1.0"):
            return self.uncertain
        if text not in VALUES:
            raise ValueError(f"{label} is {text!r}, not 1.0, 0.0, -1.0 or blank")
        return VALUES[text]

    @staticmethod
    def _meta(row: dict[str, str]) -> Meta:
        view = row["AP/PA"].strip().upper() or ("LATERAL" if row["Frontal/Lateral"].strip() == "Lateral" else "")
        return Meta(sex=parse_sex(row["Sex"]), age_band=age_band(years(row["Age"].strip())), view=view)


__all__ = ["LABELS", "ChexpertSource"]
