"""What every corex_cxr data source shares: samples, bad-data policy, splits, the cache.

A concrete source (:class:`~corex_cxr.siim.SiimSource`, :class:`~corex_cxr.folder.FolderSource`)
passes its options to ``CxrSource.__init__`` (which checks them before any file is read), reads its
own layout into :class:`Sample` records plus a list of problems (headers at most, never pixels) and
hands them to :meth:`CxrSource._accept`. :class:`CxrSource` does the rest:

* ``on_bad_sample: error`` raises one :class:`DataError` listing every problem: at construction
  for what the layout and headers show (missing files, malformed CSV rows, non-DICOM files), and
  in :meth:`CxrSource.prepare` for files that fail to decode. ``skip`` drops them, lists them in
  :meth:`CxrSource.skipped` and in ``skipped.json`` beside the cache, and says how many on
  stderr: nothing is dropped silently.
* Splits are assigned per patient (see :mod:`corex_cxr.splits`) when the source is built, so they
  do not depend on which files later fail to decode. A source with an official split (NIH's
  ``test_list.txt``, CheXpert's ``valid.csv``) fixes those patients and carves the rest.
* Every item carries ``meta`` (:mod:`corex_cxr.metadata`); ``describe()["subgroups"]`` counts it.
* Multi-label sources (``multilabel = True``) give each sample ``labels``, one float per class
  name (1 positive, 0 negative, -1 unknown or ignored), and ``label = -1``; items then carry a
  float32 ``labels`` tensor.
* Pixels are decoded once into the cache (:mod:`corex_cxr.cache`) by :meth:`CxrSource.prepare`, or
  by the first :meth:`CxrSource.split`.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corex.progress import log
from corex.rundir import write_json
from corex_cxr.cache import FULL_SCALE, RESIZE, CachedImages, CachedItem, CacheBuild, Decoder, build_cache, cache_settings, cached_errors
from corex_cxr.dicom import PERCENTILES, Box, transform_boxes
from corex_cxr.errors import DataError, printable, printable_problems
from corex_cxr.images import read_image
from corex_cxr.metadata import Meta, subgroup_counts
from corex_cxr.options import CLASS_NAMES, BadSamplePolicy
from corex_cxr.splits import (
    SPLITS,
    assign_splits,
    check_split_options,
    label_subset,
    multilabel_strata,
    patient_stratum,
)

MAX_IMAGE_SIZE = 4096  # the recipe's own limit too (corex.recipe.IMAGE_SIZES)
INTENSITY_IMAGES = 256  # images per split sampled (evenly) for describe()["intensity"]
INTENSITY_SIDE = 128  # each read at most this many pixels a side (a regular subsample)
PERCENTILES_REPORTED = (1, 5, 25, 50, 75, 95, 99)


@dataclass(frozen=True)
class Sample:
    """One image and what is known about it before decoding."""

    image_id: str
    study_id: str
    patient_id: str
    path: Path
    label: int  # index into the class names; -1 = unknown (always, for a multi-label source)
    has_mask: bool  # whether ``boxes`` is a real annotation (an empty one is a real "no opacity")
    boxes: tuple[Box, ...] = ()  # x, y, width, height in original pixels
    meta: Meta = Meta()
    labels: tuple[float, ...] | None = None  # multi-label: per class 1, 0 or -1 (unknown)


class CxrSource:
    """A :class:`corex.interfaces.DataSource` over a list of :class:`Sample`."""

    class_names = CLASS_NAMES
    multilabel = False  # True: items carry ``labels`` (one per class name) and ``label`` is -1
    # Path -> float32 [0, 1] image; a module-level function, so that decoding workers can run it.
    decoder: Decoder = staticmethod(read_image)

    def __init__(
        self,
        *,
        name: str,
        location: Path,
        image_size: int,
        seed: int,
        cache_dir: Path,
        on_bad_sample: BadSamplePolicy,
        val_fraction: float,
        test_fraction: float,
        folds: int,
        fold: int,
        workers: int,
        class_names: tuple[str, ...] = CLASS_NAMES,
        cache_variant: str = "",
    ):
        check_source_options(image_size=image_size, on_bad_sample=on_bad_sample, workers=workers)
        check_split_options(val_fraction=val_fraction, test_fraction=test_fraction, folds=folds, fold=fold)
        self.name, self.location, self.class_names = name, Path(location), class_names
        self.image_size, self.seed, self.workers = image_size, seed, workers
        self.on_bad_sample = on_bad_sample
        self._split_options = dict(val_fraction=val_fraction, test_fraction=test_fraction, folds=folds, fold=fold)
        key = [str(self.location.resolve()), cache_settings(image_size)]
        if cache_variant:  # options that choose other images from the same location
            key.append(cache_variant)
        digest = hashlib.sha1(json.dumps(key).encode())
        self.cache_path = Path(cache_dir) / "corex_cxr" / f"{name}-{image_size}px-{digest.hexdigest()[:10]}"
        self._samples: list[Sample] = []
        self._skipped: list[dict[str, Any]] = []
        self._split_of: dict[str, str] = {}
        self._study_stratum: dict[str, int] = {}
        self._cache: CacheBuild | None = None
        # Where the data came from, when it matters to a reader (the phantom: synthetic); in data.json and exports.
        self.provenance: dict[str, Any] | None = None

    def _accept(
        self, samples: list[Sample], problems: list[dict[str, Any]], fixed: dict[str, str] | None = None
    ) -> None:
        """Apply ``on_bad_sample`` to what the layout showed, then split the patients.

        ``fixed``: patient -> ``"val"`` or ``"test"`` from an official split; the other patients
        are split as usual, that split's fraction taken as 0.
        """
        if problems and self.on_bad_sample == "error":
            raise DataError.collected(self.location, problems)
        if not samples:
            raise DataError(self.location, "no usable images found")
        self._samples, self._skipped = samples, printable_problems(problems)
        self._study_stratum = self._strata(self._samples)
        patient_studies: dict[str, set[str]] = defaultdict(set)
        for sample in self._samples:
            patient_studies[sample.patient_id].add(sample.study_id)
        strata = {
            patient: patient_stratum(self._study_stratum[study] for study in sorted(studies))
            for patient, studies in patient_studies.items()
        }
        if not fixed:
            self._split_of = assign_splits(strata, seed=self.seed, **self._split_options)
            return
        options = {**self._split_options, **{f"{name}_fraction": 0.0 for name in set(fixed.values())}}
        rest = {patient: stratum for patient, stratum in strata.items() if patient not in fixed}
        self._split_of = assign_splits(rest, seed=self.seed, **options)
        self._split_of.update((patient, fixed[patient]) for patient in strata if patient in fixed)

    def _strata(self, samples: list[Sample]) -> dict[str, int]:
        """Study id -> the class it is stratified by: its label, or for a multi-label source its
        rarest positive label (:func:`corex_cxr.splits.multilabel_strata`)."""
        if not self.multilabel:
            return {sample.study_id: sample.label for sample in samples}
        return multilabel_strata(study_labels(samples))

    # -- the DataSource protocol ---------------------------------------------------------------

    def prepare(self) -> CacheBuild:
        """Decode every image into the cache now (with a progress bar); reused when up to date.

        Ends with a line on stderr: images decoded now, reused from the cache, skipped, and where
        the cache (and under ``on_bad_sample: skip``, the list of skipped samples) is.
        """
        if self._cache is not None:
            return self._cache
        paths = {sample.image_id: sample.path for sample in self._samples}
        build = build_cache(
            self.cache_path,
            paths,
            self.image_size,
            workers=self.workers,
            decode=self.decoder,
            description=f"{self.name}: decoding to {self.image_size}px cache",
        )
        if build.errors:
            problems = [{"path": printable(paths[i]), "reason": reason} for i, reason in sorted(build.errors.items())]
            if self.on_bad_sample == "error":
                raise DataError.collected(self.location, problems)
            self._skipped.extend(problems)
            self._samples = [sample for sample in self._samples if sample.image_id not in build.errors]
        self._cache = build
        if self._skipped:
            write_json(self.skipped_list, {"on_bad_sample": self.on_bad_sample, "skipped": self._skipped})
        else:
            self.skipped_list.unlink(missing_ok=True)  # an old list that no longer applies
        log(self._summary(build))  # under torch.distributed, rank 0 only
        return build

    @property
    def skipped_list(self) -> Path:
        """Where :meth:`prepare` writes the samples skipped under ``on_bad_sample: skip``."""
        return self.cache_path / "skipped.json"

    def _summary(self, build: CacheBuild) -> str:
        """``siim: 310 images decoded, 0 reused from the cache, 3 skipped (... the list is in ...); cache: ...``."""
        reused_errors = len(build.errors) - build.failed
        decoded, reused = build.decoded - build.failed, build.reused - reused_errors
        text = f"{self.name}: {decoded} images decoded, {reused} reused from the cache, {len(self._skipped)} skipped"
        if self._skipped:
            text += f" (unusable, on_bad_sample: skip; the list is in {self.skipped_list})"
        return f"{text}; cache: {self.cache_path}"

    def split(self, name: str, label_fraction: float = 1.0) -> CachedImages:
        """The images of split ``name``; with ``label_fraction < 1`` a nested subset of its
        labelled studies (:func:`corex_cxr.splits.label_subset`), every image of a chosen study."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}.")
        cache = self.prepare()
        samples = self._in_split(name)
        if label_fraction != 1.0:
            if self.multilabel:
                strata = {s.study_id: self._study_stratum[s.study_id] for s in samples}
            else:
                strata = {s.study_id: s.label for s in samples}
            chosen = label_subset(strata, label_fraction, self.seed)
            samples = [sample for sample in samples if sample.study_id in chosen]
        items = []
        for sample in samples:
            scale, pad_x, pad_y = cache.geometry[sample.image_id]
            items.append(
                CachedItem(
                    slot=cache.slots[sample.image_id],
                    label=sample.label,
                    has_mask=sample.has_mask,
                    boxes=tuple(transform_boxes(sample.boxes, scale, (pad_x, pad_y))),
                    study_id=sample.study_id,
                    image_id=sample.image_id,
                    patient_id=sample.patient_id,
                    meta=sample.meta,
                    labels=sample.labels,
                )
            )
        return CachedImages(cache.array, self.image_size, items)

    def describe(self) -> dict[str, Any]:
        """Per split: images, studies, patients and studies per class (no decoding needed; for a
        multi-label source, studies positive for each class); ``subgroups``: per split, images per
        value of each metadata field; and ``unusable``: samples skipped for what the layout
        shows, and images that cannot be decoded as far as the cache knows (``not_checked``:
        images it has not decoded yet). Once the cache is built (:meth:`prepare`), ``intensity``:
        per split, statistics of the decoded pixels (see :meth:`intensity`)."""
        summary: dict[str, Any] = {}
        for name in SPLITS:
            samples = self._in_split(name)
            study_label = {sample.study_id: sample.label for sample in samples}
            summary[name] = {
                "images": len(samples),
                "studies": len(study_label),
                "patients": len({sample.patient_id for sample in samples}),
                "classes": self._class_counts(samples, study_label),
            }
        summary["subgroups"] = {name: subgroup_counts(s.meta for s in self._in_split(name)) for name in SPLITS}
        summary["unusable"] = self._unusable()
        if self._cache is not None:
            summary["intensity"] = {name: self.intensity(name) for name in SPLITS}
        if self.provenance is not None:
            summary["provenance"] = dict(self.provenance)
        return summary

    def intensity(self, name: str) -> dict[str, Any]:
        """Statistics of the decoded pixels (``[0, 1]``) of split ``name``, for comparing sources: ``mean``,
        ``sd`` and percentiles ``p1`` ... ``p99`` over up to ``INTENSITY_IMAGES`` images taken evenly
        through the split, each read on a regular grid of at most ``INTENSITY_SIDE`` pixels a side, the
        zero padding around a non-square image left out; ``images`` says how many were read."""
        import numpy as np

        cache = self.prepare()
        samples = [s for s in self._in_split(name) if s.image_id in cache.slots]
        if not samples:
            return {"images": 0}
        chosen = [samples[i] for i in np.linspace(0, len(samples) - 1, min(INTENSITY_IMAGES, len(samples))).round().astype(int)]
        pixels = np.load(cache.array, mmap_mode="r")
        step = max(1, self.image_size // INTENSITY_SIDE)
        values = []
        for sample in chosen:
            _, pad_x, pad_y = cache.geometry[sample.image_id]
            image = pixels[cache.slots[sample.image_id], pad_y : self.image_size - pad_y : step, pad_x : self.image_size - pad_x : step]
            values.append(np.asarray(image, dtype=np.float64).ravel())
        flat = np.concatenate(values) / FULL_SCALE
        stats = {"images": len(chosen), "mean": float(flat.mean()), "sd": float(flat.std())}
        stats.update({f"p{q}": float(v) for q, v in zip(PERCENTILES_REPORTED, np.percentile(flat, PERCENTILES_REPORTED))})
        return stats

    def _class_counts(self, samples: list[Sample], study_label: dict[str, int]) -> dict[str, int]:
        if not self.multilabel:
            return {
                class_name: sum(label == index for label in study_label.values())
                for index, class_name in enumerate(self.class_names)
            }
        labels = study_labels(samples).values()
        return {name: sum(row[index] == 1.0 for row in labels) for index, name in enumerate(self.class_names)}

    def _unusable(self) -> dict[str, Any]:
        paths = {sample.image_id: sample.path for sample in self._samples}
        # After prepare() in this process the undecodable ones are skipped already, so none remain.
        errors, unknown = cached_errors(self.cache_path, paths, self.image_size)
        undecodable = len(errors)
        if unknown:
            note = (f"images that cannot be decoded: {undecodable} known, {unknown} of {len(paths)} not checked yet "
                    "(only decoding tells; `corex data prepare` decodes them all)")
        else:
            note = f"images that cannot be decoded: {undecodable} (every image checked by the cache)"
        if self._skipped:
            note += f"; {len(self._skipped)} sample(s) skipped by on_bad_sample: skip"
        return {
            "skipped": len(self._skipped),
            "undecodable": undecodable,
            "not_checked": unknown,
            "images": len(paths),
            "note": note,
        }

    def skipped(self) -> list[dict[str, Any]]:
        """Every sample dropped under ``on_bad_sample: skip``, as ``{"path", "reason"}``."""
        return list(self._skipped)

    @property
    def normalization(self) -> dict[str, Any]:
        """The intensity pipeline, for export metadata (see :mod:`corex_cxr.dicom`)."""
        return {
            "range": [0.0, 1.0],
            "meaning": "0 = air (black), 1 = dense (white), MONOCHROME2",
            "dicom": [
                "modality LUT (rescale slope/intercept)",
                "VOI LUT sequence, else first window center/width, "
                f"else percentiles {PERCENTILES[0]}-{PERCENTILES[1]} to [0, 1]",
                "MONOCHROME1 inverted after the VOI",
            ],
            "png_jpeg": "divided by the type's maximum (255 or 65535), no windowing",
            "geometry": RESIZE,
            "image_size": self.image_size,
            "cache_dtype": "uint16",
        }

    def _in_split(self, name: str) -> list[Sample]:
        return [sample for sample in self._samples if self._split_of[sample.patient_id] == name]


def study_labels(samples: list[Sample]) -> dict[str, tuple[float, ...]]:
    """Study id -> its multi-label target: per class the largest of its images' values (a study is
    positive for what any of its images is positive for)."""
    labels: dict[str, tuple[float, ...]] = {}
    for sample in samples:
        if sample.labels is not None:
            prior = labels.get(sample.study_id)
            labels[sample.study_id] = sample.labels if prior is None else tuple(map(max, prior, sample.labels))
    return labels


def check_source_options(*, image_size: int, on_bad_sample: str, workers: int) -> None:
    """Raise a specific ``ValueError`` for source options that are well-typed but wrong."""
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}.")
    if image_size > MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be at most {MAX_IMAGE_SIZE} pixels (the decoded cache holds 2 bytes per pixel), got {image_size}."
        )
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}.")
    if workers < 0:
        raise ValueError(f"workers must be 0 (one per CPU) or more, got {workers}.")


__all__ = ["CLASS_NAMES", "BadSamplePolicy", "CxrSource", "Sample"]
