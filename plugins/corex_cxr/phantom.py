"""The phantom: synthetic chest radiographs written in the SIIM-FISABIO-RSNA COVID-19 layout.

corex's embedded default data. The generator draws a schematic PA chest radiograph (anatomy in
:mod:`corex_cxr.anatomy`) and adds the class's findings, following the study-level categories of
the competition that the paper uses (Ridzuan et al., MIUA 2022, arXiv 2201.06052):

* negative for pneumonia: no opacity, no box;
* typical appearance: bilateral, peripheral, lower-zone, multifocal ground-glass opacities;
* indeterminate appearance: unilateral, central (perihilar) or upper-zone opacities, absent a
  typical pattern;
* atypical appearance: lobar consolidation, a single nodule or mass, or a pleural effusion.

``difficulty`` (0 to 1) sets how separable these are: at 0 the findings are dense and canonical;
towards 1 they are fainter, their locations overlap between classes (typical sometimes
unilateral, indeterminate sometimes lower-zone) and patients, exposure and noise vary more, so
typical, indeterminate and atypical become genuinely hard to tell apart, as on the real data.

:func:`write_siim_phantom` writes the competition's files, so the real SIIM loader reads them::

    OUT/train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    OUT/train_study_level.csv   id,Negative for Pneumonia,Typical Appearance,...  (one-hot)
    OUT/train_image_level.csv   id,boxes,label,StudyInstanceUID
    OUT/phantom.json            the generator's settings and the true class of relabelled studies

Headers for subgroup analysis (sex, age, view, portable, manufacturer; see
:mod:`corex_cxr.metadata`) are drawn from a random stream of their own, so they move no pixel,
label or box. ``hard_subgroup: ap_portable`` (off by default) plants a harder subgroup: AP
portable images are rendered foggier (lower contrast) and noisier, as bedside films are.

From the command line: ``corex data phantom OUT --studies 200 --seed 0`` (:mod:`corex_cxr.cli`).
As a recipe's data source: ``phantom`` (:func:`phantom_siim_source`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from corex.progress import progress as progress_bar
from corex_cxr.anatomy import Pose, Thorax, blob, blur, draw_thorax, ramp, smooth_noise, superellipse
from corex_cxr.options import BadSamplePolicy, HardSubgroup

CLASS_COLUMNS = (
    "Negative for Pneumonia",
    "Typical Appearance",
    "Indeterminate Appearance",
    "Atypical Appearance",
)
NEGATIVE, TYPICAL, INDETERMINATE, ATYPICAL = range(4)

# Approximately the competition's 6,054 training studies: 1,676 negative, 2,855 typical,
# 1,049 indeterminate and 474 atypical.
DEFAULT_CLASS_BALANCE = (0.277, 0.472, 0.173, 0.078)

Box = tuple[float, float, float, float]  # x, y, width, height in pixels

HARD_SUBGROUPS = ("none", "ap_portable")
# Realistic vendors per modality: computed radiography plates, digital (often mobile) detectors.
MANUFACTURERS = {
    "CR": ("FUJIFILM Corporation", "Carestream Health", "Agfa", "KONICA MINOLTA"),
    "DX": ("GE Healthcare", "Philips Medical Systems", "SIEMENS", "Carestream Health", "Agfa"),
}

# -- rendering -------------------------------------------------------------------------------------


def render_study(
    rng: np.random.Generator, label: int, size: int = 256, difficulty: float = 0.5, degrade: float = 0.0
) -> tuple[np.ndarray, list[Box]]:
    """One radiograph (float32 in [0,1], MONOCHROME2: dense = bright) and its opacity boxes
    (x, y, width, height) in pixels.

    ``label`` is the class index in :data:`CLASS_COLUMNS` order. The patient (anatomy, pose,
    exposure, noise) depends only on ``rng``, not on ``label``: one seed rendered with each label
    shows the same patient with different findings. ``difficulty`` in [0, 1]: 0 gives dense,
    canonical findings; 1 faint ones in overlapping places on more varied patients (see the module
    docstring). Boxes are tight around each finding (one per affected lung, or per lesion),
    loosened a little at random like a radiologist's. ``degrade`` in [0, 1] (0: off) makes the
    findings fainter (their density times ``1 - degrade``: gone at 1) and fogs and noises the exposure
    (:func:`expose`) of the same patient.
    """
    if label not in range(len(CLASS_COLUMNS)):
        raise ValueError(f"label {label!r} is not a class index in 0..{len(CLASS_COLUMNS) - 1}")
    _check_size(size)
    _check_fraction("difficulty", difficulty)
    anatomy_rng, finding_rng, imaging_rng = rng.spawn(3)

    # Harder data sets also vary more from patient to patient.
    variation = 0.6 + 0.8 * difficulty
    pose = Pose(
        shift_u=float(anatomy_rng.uniform(-0.05, 0.05) * variation),
        shift_v=float(anatomy_rng.uniform(-0.05, 0.05) * variation),
        scale=float(anatomy_rng.uniform(0.9, 1.02)),
        rotation=float(anatomy_rng.uniform(-0.06, 0.06) * variation),
    )
    # Anatomy and findings are smooth: draw them at half resolution (a quarter of the work) and
    # upsample; the noise comes at full resolution.
    factor = 2 if size >= 128 else 1
    drawn = -(-size // factor)
    u, v = pose.grid(drawn)
    thorax = draw_thorax(u, v, anatomy_rng, variation, pixel=2.0 / (drawn * pose.scale))
    findings = draw_findings(u, v, thorax, label, difficulty, finding_rng)

    # A portable film in a harder subgroup also shows its opacities fainter (scatter, a supine patient,
    # less inspiration): the findings themselves lose contrast, so the task gets harder, not just noisier.
    faint = np.float32(1.0 - degrade)
    density = thorax.density + sum((f * faint for f in findings) if degrade else findings, np.zeros_like(thorax.density))
    density = np.repeat(np.repeat(density, factor, axis=0), factor, axis=1)[:size, :size]
    image = expose(density, imaging_rng, difficulty, degrade)
    boxes = [_box_around(finding, factor, size, finding_rng) for finding in findings if finding.max() > 0]
    return image, boxes


def expose(density: np.ndarray, rng: np.random.Generator, difficulty: float, degrade: float = 0.0) -> np.ndarray:
    """Density to intensity: an exposure curve of random contrast, quantum-like noise (its spread
    grows with the square root of the signal) and the detector's blur. ``degrade`` > 0: scatter
    (no grid at the bedside) scales the contrast by ``1 - degrade / 2`` and a lower dose the
    noise by ``1 + 8 * degrade`` (the base noise is faint); the random draws are the same."""
    contrast = rng.uniform(1.8, 3.2)
    image = (1.0 - np.exp(-contrast * density)) / (1.0 - np.exp(-contrast * 0.85))
    # Uniform noise of unit variance is several times cheaper to draw than Gaussian, and the blur
    # (a weighted sum of nine pixels) makes it close to Gaussian anyway.
    noise = rng.uniform(0.012, 0.03) * (0.7 + 0.8 * difficulty)
    if degrade:
        fog = image.mean()
        image = fog + (1.0 - 0.5 * degrade) * (image - fog)
        noise *= 1.0 + 8.0 * degrade
    unit = (rng.random(image.shape, dtype=np.float32) - 0.5) * np.float32(12**0.5)
    image += noise * np.sqrt(np.clip(image, 0.0, None) + 0.02) * unit
    image = blur(image, passes=int(rng.integers(1, 3)))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def draw_findings(
    u: np.ndarray, v: np.ndarray, thorax: Thorax, label: int, difficulty: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """The class's findings as density layers, one per box, each confined to a lung."""
    if label == NEGATIVE:
        return []
    overlap = 0.5 * difficulty  # chance that a finding strays from its class's canonical pattern
    both_sides = (-1, 1)
    if label in (TYPICAL, INDETERMINATE):
        typical = label == TYPICAL
        # Typical is bilateral, indeterminate unilateral; a stray one is the other way round.
        bilateral = typical == (rng.random() >= overlap)
        sides = both_sides if bilateral else (int(rng.choice(both_sides)),)
        most_foci = 3 if typical else 2
        shapes = []
        for side in sides:
            zones = [_zone(typical, overlap, rng) for _ in range(rng.integers(1, most_foci + 1))]
            shapes.append(("ground glass", _ground_glass(u, v, thorax, side, zones, rng)))
    else:
        side = int(rng.choice(both_sides))
        kind = str(rng.choice(["consolidation", "nodule", "effusion"], p=[0.5, 0.25, 0.25]))
        draw = {"consolidation": _consolidation, "nodule": _nodule, "effusion": _effusion}[kind]
        shapes = [(kind, draw(u, v, thorax, side, difficulty, rng))]

    # Fainter findings when harder: at difficulty 1, 40 % of their difficulty-0 density.
    strength = 1.0 - 0.6 * difficulty
    layers = []
    for kind, shape in shapes:
        if shape.max() < 0.5:  # mostly hidden behind the heart or outside the lung: not drawn
            continue
        low, high = DENSITY[kind]
        layers.append(shape * np.float32(rng.uniform(low, high) * strength * thorax.air))
    return layers


# How much of the lung's air each finding replaces at difficulty 0 (a range to draw from).
DENSITY = {
    "ground glass": (0.6, 0.85),
    "consolidation": (0.75, 0.95),
    "nodule": (0.8, 1.0),
    "effusion": (0.8, 1.0),
}


def _zone(typical: bool, overlap: float, rng: np.random.Generator) -> str:
    """Where a ground-glass focus goes: its class's canonical zone, or (with chance ``overlap``)
    one that belongs to, or is shared with, the other class."""
    canonical = rng.random() >= overlap
    if typical:
        return "lower-peripheral" if canonical else "anywhere"
    return str(rng.choice(["central", "upper"])) if canonical else "lower-peripheral"


# Where findings sit, as ranges of (distance from the midline, height) in anatomical coordinates.
ZONES = {
    "lower-peripheral": ((0.48, 0.66), (0.05, 0.32)),
    "central": ((0.2, 0.36), (-0.22, 0.02)),
    "upper": ((0.25, 0.6), (-0.52, -0.25)),
    "anywhere": ((0.3, 0.66), (-0.5, 0.3)),
}

# The finding shapes below are in [0, 1] (1 = as dense as the finding gets) and confined to a lung.


def _ground_glass(
    u: np.ndarray, v: np.ndarray, thorax: Thorax, side: int, zones: list[str], rng: np.random.Generator
) -> np.ndarray:
    """Hazy, patchy opacities (one soft focus per zone) in one lung: the lung markings stay visible."""
    haze = np.zeros_like(u)
    for zone in zones:
        (lateral_lo, lateral_hi), (v_lo, v_hi) = ZONES[zone]
        centre_u, centre_v = side * rng.uniform(lateral_lo, lateral_hi), rng.uniform(v_lo, v_hi)
        focus = blob(u, v, centre_u, centre_v, rng.uniform(0.07, 0.13), rng.uniform(0.08, 0.15))
        haze = np.maximum(haze, focus)
    patchy = 0.5 + smooth_noise(rng, u.shape[0], 10)
    return np.clip(haze * patchy, 0.0, 1.0) * thorax.lung(side)


def _consolidation(
    u: np.ndarray, v: np.ndarray, thorax: Thorax, side: int, difficulty: float, rng: np.random.Generator
) -> np.ndarray:
    """Lobar consolidation: a dense lobe bounded by a fissure; patchier (more like ground glass)
    when harder."""
    fissure = -0.12 + rng.uniform(-0.06, 0.06) + 0.2 * (side * u - 0.4)  # rises towards the hilum
    lobe = ramp(v - fissure, 0.05) if rng.random() < 0.5 else ramp(fissure - v, 0.05)
    patchiness = 0.15 + 0.5 * difficulty
    return lobe * (1.0 - patchiness * smooth_noise(rng, u.shape[0], 12)) * thorax.lung(side)


def _nodule(
    u: np.ndarray, v: np.ndarray, thorax: Thorax, side: int, difficulty: float, rng: np.random.Generator
) -> np.ndarray:
    """A single round nodule or mass with a fairly sharp edge."""
    radius = rng.uniform(0.045, 0.11)
    centre_u, centre_v = side * rng.uniform(0.3, 0.6), rng.uniform(-0.45, 0.1)
    ball = ramp(1.0 - np.sqrt(superellipse(u, v, centre_u, centre_v, radius, radius)), 0.35)
    return ball * thorax.lung(side)


def _effusion(
    u: np.ndarray, v: np.ndarray, thorax: Thorax, side: int, difficulty: float, rng: np.random.Generator
) -> np.ndarray:
    """Pleural effusion: fluid fills the lung base, blunting the costophrenic angle, its surface a
    meniscus that climbs the lateral chest wall."""
    level = rng.uniform(0.12, 0.3)
    surface = level - 0.5 * np.clip(side * u - 0.3, 0.0, None) ** 2 / 0.2
    return ramp(v - surface, 0.08) * thorax.lung(side)


def _box_around(finding: np.ndarray, factor: int, size: int, rng: np.random.Generator) -> Box:
    """The box around the pixels where ``finding`` (drawn ``factor`` times smaller than the image)
    reaches a quarter of its peak, each edge moved outwards (rarely inwards) by a few per cent of
    the box, clipped to the image."""
    above = finding >= 0.25 * finding.max()
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    x0, x1 = factor * float(cols[0]), factor * float(cols[-1] + 1)
    y0, y1 = factor * float(rows[0]), factor * float(rows[-1] + 1)
    width, height = x1 - x0, y1 - y0
    left, right, top, bottom = (float(f) for f in rng.uniform(-0.02, 0.08, size=4))
    x0, x1 = max(0.0, x0 - left * width), min(float(size), x1 + right * width)
    y0, y1 = max(0.0, y0 - top * height), min(float(size), y1 + bottom * height)
    return (round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3))


# -- the data set ----------------------------------------------------------------------------------


def write_siim_phantom(
    out: Path,
    *,
    studies: int,
    seed: int = 0,
    size: int = 256,
    difficulty: float = 0.5,
    label_noise: float = 0.0,
    class_balance: Sequence[float] | None = None,
    hard_subgroup: HardSubgroup = "none",
    hard_subgroup_strength: float = 0.5,
    progress: bool = True,
) -> Path:
    """Write a phantom data set in the SIIM layout under out; returns out. Atomic: builds in a temp
    sibling then renames, so an interrupted run never leaves a half data set. Deterministic by seed
    (same seed -> byte-identical CSVs and pixel data).

    Like the real data: class frequencies follow ``class_balance`` (default: the competition's,
    about 28/47/17/8 %), with at least one study per class when there are enough studies; about
    6 % of studies hold 2-3 images (the extra images carry boxes only half the time, and about 3 %
    of first images of positive studies have none: "usually, not always"); about 10 % of patients
    have two studies; about 20 % of images are MONOCHROME1 (stored inverted); DX and CR, 12 and
    16 bits stored, some with a rescale and some with a VOI window.

    ``label_noise`` is the fraction of studies whose CSV label is switched to a random other class;
    their images keep the true findings (and lose their boxes when relabelled negative, as a
    radiologist calling it negative would draw none). ``phantom.json`` records their true classes.

    Headers for subgroup analysis come from their own stream (:func:`_headers`): patients about
    55 % male, aged 20-90 (PatientAge ``NNNY``, one sex and age per patient); images about 55 % AP,
    80 % of those portable (``PORTABLE`` in SeriesDescription), the rest PA; a Manufacturer from a
    short list per modality.

    ``hard_subgroup: ap_portable`` renders the AP portable images with ``degrade =
    hard_subgroup_strength`` (foggier, noisier; :func:`expose`); ``phantom.json`` records it.

    Image ``k`` of study ``j`` is ``render_study(np.random.default_rng((seed, j, k)), true_class,
    size, difficulty, degrade)``, so any image can be re-rendered.
    """
    out = Path(out)
    if studies < 1:
        raise ValueError(f"studies must be at least 1, got {studies}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    _check_size(size)
    _check_fraction("difficulty", difficulty)
    _check_fraction("label_noise", label_noise)
    check_hard_subgroup(hard_subgroup, hard_subgroup_strength)
    balance = _check_balance(class_balance)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"phantom output {out} already exists and is not an empty directory")

    plan = _plan(studies, seed, label_noise, balance)
    headers = _headers(plan, seed)
    strength = hard_subgroup_strength if hard_subgroup == "ap_portable" else 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    try:
        building.mkdir()
        _write(building, plan, headers, seed, size, difficulty, strength, progress)
        manifest = {"hard_subgroup": hard_subgroup, "hard_subgroup_strength": hard_subgroup_strength,
                    "hard_subgroup_images": sum(h.ap_portable for h in headers.values()) if strength else 0}
        _write_manifest(building, plan, seed, size, difficulty, label_noise, balance, manifest)
        try:
            os.replace(building, out)
        except OSError:
            if not (out / "train_image_level.csv").exists():
                raise
            # Another process finished the same data set first (same arguments, same bytes).
            shutil.rmtree(building)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return out


@dataclass(frozen=True)
class ImagePlan:
    """One DICOM file to write: which render, its UIDs, and its DICOM flavour."""

    index: int  # within its study: the render is default_rng((seed, study, index))
    uid: str
    series_uid: str
    series_number: int
    boxed: bool  # whether its boxes go into the CSV
    modality: str
    monochrome1: bool
    bits: int
    stored_range: tuple[float, float]  # fractions of the bit depth's full scale
    rescale: tuple[float, float] | None  # slope, intercept
    window: bool


@dataclass(frozen=True)
class StudyPlan:
    index: int
    uid: str
    truth: int  # the class whose findings the images show
    label: int  # the class in the CSV (differs from truth under label noise)
    patient: str
    images: list[ImagePlan]


@dataclass(frozen=True)
class Headers:
    """One image's header values for subgroup analysis (:func:`_headers`)."""

    sex: str
    age: int  # years
    view: str  # AP or PA
    portable: bool
    manufacturer: str

    @property
    def ap_portable(self) -> bool:
        return self.view == "AP" and self.portable


def _plan(studies: int, seed: int, label_noise: float, balance: np.ndarray) -> list[StudyPlan]:
    """Decide everything but the pixels: classes, relabelling, patients, images and their DICOM
    flavour. Counts are exact (not sampled) so even tiny data sets have each feature."""
    rng = np.random.default_rng(seed)
    counts = _largest_remainder(balance, studies)
    for cls in np.flatnonzero(balance > 0):
        if counts[cls] == 0 and studies >= np.count_nonzero(balance):
            counts[int(np.argmax(counts))] -= 1
            counts[cls] += 1
    truth = rng.permutation(np.repeat(np.arange(len(CLASS_COLUMNS)), counts))
    labels = truth.copy()
    for j in rng.choice(studies, round(label_noise * studies), replace=False):
        labels[j] = rng.choice([c for c in range(len(CLASS_COLUMNS)) if c != truth[j]])

    # ~10 % of patients have two studies: with p pairs among n studies, p / (n - p) = 0.1.
    pairs = round(studies / 11)
    patients = rng.permutation(np.concatenate([np.arange(pairs), np.arange(studies - pairs)]))
    # Once the patients' sex: now drawn by _headers, but still drawn here so that every later draw
    # of this stream (hence every pixel, label and box) stays as it was. The same for the view below.
    rng.choice(["F", "M"], size=studies - pairs)
    images = np.ones(studies, dtype=int)
    images[rng.choice(studies, round(0.06 * studies), replace=False)] = 2
    images[(images == 2) & (rng.random(studies) < 0.25)] = 3
    monochrome1 = np.zeros(int(images.sum()), dtype=bool)
    monochrome1[rng.choice(monochrome1.size, round(0.2 * monochrome1.size), replace=False)] = True
    monochrome1_of = iter(monochrome1)

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["corex-phantom", str(seed), *map(str, parts)])

    plan = []
    for j in range(studies):
        series_uid, series_number, study_images = uid("series", j, 0), 1, []
        for k in range(int(images[j])):
            if k > 0 and rng.random() < 0.5:  # a repeat acquisition in a new series
                series_uid, series_number = uid("series", j, k), series_number + 1
            boxed = rng.random() >= (0.03 if k == 0 else 0.5) and labels[j] != NEGATIVE
            rescaled = rng.random() < 0.15
            modality = str(rng.choice(["DX", "CR"]))
            rng.choice(["PA", "AP"], p=[0.6, 0.4])  # once the view (see above)
            study_images.append(ImagePlan(
                index=k,
                uid=uid("image", j, k),
                series_uid=series_uid,
                series_number=series_number,
                boxed=bool(boxed),
                modality=modality,
                monochrome1=bool(next(monochrome1_of)),
                bits=int(rng.choice([12, 16])),
                stored_range=(float(rng.uniform(0.0, 0.08)), float(rng.uniform(0.7, 1.0))),
                rescale=(float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([-1024.0, 0.0, 100.0])))
                if rescaled else None,
                window=bool(rng.random() < 0.3),
            ))
        plan.append(StudyPlan(
            index=j, uid=uid("study", j), truth=int(truth[j]), label=int(labels[j]),
            patient=f"phantom-{seed}-{int(patients[j]):05d}", images=study_images,
        ))
    return plan


def _headers(plan: list[StudyPlan], seed: int) -> dict[str, Headers]:
    """Image UID -> its header values, from a stream of their own (no pixel depends on it)."""
    rng = np.random.default_rng([seed, *b"headers"])
    patients = sorted({study.patient for study in plan})
    sexes = rng.choice(["M", "F"], size=len(patients), p=[0.55, 0.45])
    ages = np.clip(np.rint(rng.normal(60.0, 16.0, size=len(patients))), 20, 90).astype(int)
    patient = {p: (str(sex), int(age)) for p, sex, age in zip(patients, sexes, ages)}
    headers = {}
    for study in plan:
        sex, age = patient[study.patient]
        for image in study.images:
            view = str(rng.choice(["AP", "PA"], p=[0.55, 0.45]))
            portable = view == "AP" and bool(rng.random() < 0.8)
            manufacturer = str(rng.choice(MANUFACTURERS[image.modality]))
            headers[image.uid] = Headers(sex, age, view, portable, manufacturer)
    return headers


def _write(
    root: Path, plan: list[StudyPlan], headers: dict[str, Headers], seed: int, size: int, difficulty: float,
    strength: float, progress: bool,
) -> None:
    """The DICOMs and CSVs; ``strength`` > 0 degrades the AP portable images by that much."""
    study_rows, image_rows = [], []
    bar = progress_bar(len(plan), "phantom", unit="study") if progress else None
    try:
        for study in plan:
            one_hot = [int(c == study.label) for c in range(len(CLASS_COLUMNS))]
            study_rows.append([f"{study.uid}_study", *one_hot])
            for image in study.images:
                rng = np.random.default_rng((seed, study.index, image.index))
                degrade = strength if headers[image.uid].ap_portable else 0.0
                pixels, boxes = render_study(rng, study.truth, size, difficulty, degrade)
                folder = root / "train" / study.uid / image.series_uid
                folder.mkdir(parents=True, exist_ok=True)
                ds = _dicom(pixels, study, image, headers[image.uid])
                ds.save_as(folder / f"{image.uid}.dcm", enforce_file_format=True)
                image_rows.append([f"{image.uid}_image", *_box_columns(boxes if image.boxed else []), study.uid])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    _write_csv(root / "train_study_level.csv", ["id", *CLASS_COLUMNS], study_rows)
    _write_csv(root / "train_image_level.csv", ["id", "boxes", "label", "StudyInstanceUID"], image_rows)


def _box_columns(boxes: list[Box]) -> tuple[str, str]:
    """The competition's ``boxes`` (a Python-literal list of dicts, empty when none) and
    ``label`` (``opacity 1 xmin ymin xmax ymax`` per box, or ``none 1 0 0 1 1``) columns."""
    if not boxes:
        return "", "none 1 0 0 1 1"
    as_dicts = [{"x": x, "y": y, "width": w, "height": h} for x, y, w, h in boxes]
    label = " ".join(f"opacity 1 {x} {y} {round(x + w, 3)} {round(y + h, 3)}" for x, y, w, h in boxes)
    return repr(as_dicts), label


def _dicom(pixels: np.ndarray, study: StudyPlan, image: ImagePlan, headers: Headers) -> Dataset:
    """An uncompressed (Explicit VR Little Endian) DX or CR image of ``pixels`` (MONOCHROME2 in
    [0, 1]), stored over part of the bit depth's range, inverted when MONOCHROME1."""
    if image.modality == "CR":
        sop_class = ComputedRadiographyImageStorage
    else:
        sop_class = DigitalXRayImageStorageForPresentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = image.uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, image.uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study.uid, image.series_uid
    ds.PatientID, ds.PatientName = study.patient, f"Phantom^{study.patient}"
    ds.PatientSex, ds.PatientAge = headers.sex, f"{headers.age:03d}Y"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = image.modality, "CHEST", headers.view
    ds.Manufacturer, ds.StudyDescription = headers.manufacturer, "XR CHEST"
    ds.SeriesDescription = f"CHEST {headers.view}" + (" PORTABLE" if headers.portable else "")
    ds.SeriesNumber, ds.InstanceNumber = image.series_number, image.index + 1
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = ds.ImagerPixelSpacing = [round(430.0 / pixels.shape[0], 4)] * 2  # a 43 cm detector
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if image.monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, image.bits, image.bits - 1, 0

    full_scale = 2**image.bits - 1
    low, high = (round(f * full_scale) for f in image.stored_range)
    brightness = 1.0 - pixels if image.monochrome1 else pixels
    stored = np.rint(low + brightness * (high - low)).astype("<u2")
    ds.PixelData = stored.tobytes()
    slope, intercept = image.rescale or (1.0, 0.0)
    if image.rescale:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    if image.window:  # a window just wider than the stored values: the VOI transform keeps them
        ds.WindowCenter = round(slope * (low + high) / 2 + intercept, 1)
        ds.WindowWidth = round(slope * (high - low) * 1.05, 1)
    return ds


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_manifest(
    root: Path, plan: list[StudyPlan], seed: int, size: int, difficulty: float, label_noise: float,
    balance: np.ndarray, extra: dict,
) -> None:
    manifest = {
        "generator": "corex phantom",
        "seed": seed, "size": size, "difficulty": difficulty, "label_noise": label_noise,
        "class_balance": [round(float(b), 6) for b in balance], **extra,
        "studies": len(plan), "images": sum(len(study.images) for study in plan),
        "relabelled": {f"{s.uid}_study": CLASS_COLUMNS[s.truth] for s in plan if s.truth != s.label},
    }
    (root / "phantom.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights``."""
    exact = weights * total
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: total - counts.sum()]] += 1
    return counts


def _check_size(size: int) -> None:
    if not 32 <= size <= 4096:
        raise ValueError(f"size must be between 32 and 4096 pixels, got {size}")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")


def check_hard_subgroup(hard_subgroup: str, strength: float) -> None:
    if hard_subgroup not in HARD_SUBGROUPS:
        raise ValueError(f"hard_subgroup must be one of {', '.join(HARD_SUBGROUPS)}, got {hard_subgroup!r}")
    _check_fraction("hard_subgroup_strength", strength)


def _check_balance(class_balance: Sequence[float] | None) -> np.ndarray:
    if class_balance is None:
        class_balance = DEFAULT_CLASS_BALANCE
    weights = np.asarray(class_balance, dtype=float)
    if weights.shape != (len(CLASS_COLUMNS),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"class_balance must be {len(CLASS_COLUMNS)} non-negative weights with a positive sum "
            f"(negative, typical, indeterminate, atypical), got {list(class_balance)}"
        )
    return weights / weights.sum()


# -- command line ----------------------------------------------------------------------------------


# -- as a data source ------------------------------------------------------------------------------


def phantom_siim_source(
    *,
    image_size: int,
    seed: int = 0,
    cache_dir: Path,
    studies: int = 400,
    difficulty: float = 0.5,
    label_noise: float = 0.0,
    hard_subgroup: HardSubgroup = "none",
    hard_subgroup_strength: float = 0.5,
    size: int | None = None,
    on_bad_sample: BadSamplePolicy = "error",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int = 0,
    fold: int = 0,
    workers: int = 0,
):
    """The phantom written once to ``cache_dir/phantom/<settings>``, read by the real SIIM loader.

    ``size`` is the side of the written DICOMs, by default ``2 * image_size`` so the loader
    really resizes. ``hard_subgroup`` and its strength are part of the folder's key, so a planted
    and an unplanted phantom never share files. The recipe's ``phantom`` source
    (:func:`corex_cxr.phantom_source`).
    """
    from corex_cxr.siim import SiimSource  # imports torch (the cache); `corex data phantom` needs none
    from corex_cxr.source import check_source_options
    from corex_cxr.splits import check_split_options

    # Checked before the (slow) writing, which they do not affect.
    check_source_options(image_size=image_size, on_bad_sample=on_bad_sample, workers=workers)
    check_split_options(val_fraction=val_fraction, test_fraction=test_fraction, folds=folds, fold=fold)
    check_hard_subgroup(hard_subgroup, hard_subgroup_strength)
    size = 2 * image_size if size is None else size
    settings = {"studies": studies, "seed": seed, "size": size, "difficulty": difficulty, "label_noise": label_noise,
                "hard_subgroup": hard_subgroup}  # new in the key: phantoms written before it lack the headers
    if hard_subgroup != "none":
        settings["hard_subgroup_strength"] = hard_subgroup_strength
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    root = Path(cache_dir).expanduser() / "phantom" / f"{studies}studies-seed{seed}-{size}px-{digest}"
    if not (root / "train_image_level.csv").is_file():
        write_siim_phantom(
            root, studies=studies, seed=seed, size=size, difficulty=difficulty, label_noise=label_noise,
            hard_subgroup=hard_subgroup, hard_subgroup_strength=hard_subgroup_strength,
        )
    source = SiimSource(
        root=root,
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
    source.provenance = {"synthetic": True, "generator": "corex_cxr.phantom", "settings": settings,
                         "note": "synthetic chest radiographs drawn by corex: a model trained on them must not be used on patients"}
    return source
