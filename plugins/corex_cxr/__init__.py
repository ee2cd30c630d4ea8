"""corex_cxr: chest X-ray data sources (SIIM-FISABIO-RSNA, image folders, the synthetic phantom,
NIH ChestX-ray14, CheXpert).

Every source decodes its images once into a cache at the recipe's ``image_size`` and serves
patient-grouped, stratified splits; intensities are float32 in ``[0, 1]``, 0 = air (see
:mod:`corex_cxr.dicom` and docs/data.md). Every item carries ``meta`` for subgroup analysis
(:mod:`corex_cxr.metadata`); the multi-label sources (``multilabel = True``) add ``labels``.

=========  ==============================  =====================================================
name       factory                         data
=========  ==============================  =====================================================
siim       :func:`siim_source`             the competition's DICOMs and CSVs under ``root``
                                           (:class:`~corex_cxr.siim.SiimSource`)
folder     :func:`folder_source`           PNG/JPEG/DICOM files plus a CSV of labels
                                           (:class:`~corex_cxr.folder.FolderSource`)
phantom    :func:`phantom_source`          synthetic radiographs written in the SIIM layout
                                           (:func:`~corex_cxr.phantom.phantom_siim_source`)
nih_cxr14  :func:`nih_source`              NIH ChestX-ray14, 14 findings, multi-label
                                           (:class:`~corex_cxr.nih.NihSource`)
chexpert   :func:`chexpert_source`         CheXpert, 14 observations with uncertainty, multi-label
                                           (:class:`~corex_cxr.chexpert.ChexpertSource`)
=========  ==============================  =====================================================

This module imports no torch, numpy or pydicom: ``corex --help`` and ``corex plugins`` load it to
read the factories' signatures, and each factory imports its implementation when a run builds it.
"""

from __future__ import annotations

from pathlib import Path

from corex import hookimpl
from corex.interfaces import DataSource
from corex.lazy import lazy_exports
from corex_cxr.cli import corex_cli
from corex_cxr.errors import DataError, printable
from corex_cxr.options import CLASS_NAMES, BadSamplePolicy, HardSubgroup, UncertainPolicy, Views


def siim_source(
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
) -> DataSource:
    """The SIIM-FISABIO-RSNA data under ``root`` (see :class:`corex_cxr.siim.SiimSource`)."""
    from corex_cxr.siim import SiimSource

    return SiimSource(root=root, image_size=image_size, seed=seed, cache_dir=cache_dir, on_bad_sample=on_bad_sample,
                      val_fraction=val_fraction, test_fraction=test_fraction, folds=folds, fold=fold, workers=workers)


def folder_source(
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
) -> DataSource:
    """Image files plus a CSV of labels (see :class:`corex_cxr.folder.FolderSource`)."""
    from corex_cxr.folder import FolderSource

    return FolderSource(root=root, csv=csv, image_size=image_size, seed=seed, cache_dir=cache_dir,
                        image_column=image_column, label_column=label_column, classes=classes,
                        box_columns=box_columns, boxes_column=boxes_column, study_column=study_column,
                        patient_column=patient_column, on_bad_sample=on_bad_sample, val_fraction=val_fraction,
                        test_fraction=test_fraction, folds=folds, fold=fold, workers=workers)


def phantom_source(
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
) -> DataSource:
    """The synthetic phantom, written once and read by the SIIM loader (see
    :func:`corex_cxr.phantom.phantom_siim_source`)."""
    from corex_cxr.phantom import phantom_siim_source

    return phantom_siim_source(image_size=image_size, seed=seed, cache_dir=cache_dir, studies=studies,
                               difficulty=difficulty, label_noise=label_noise, hard_subgroup=hard_subgroup,
                               hard_subgroup_strength=hard_subgroup_strength, size=size, on_bad_sample=on_bad_sample,
                               val_fraction=val_fraction, test_fraction=test_fraction, folds=folds, fold=fold,
                               workers=workers)


def nih_source(
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
) -> DataSource:
    """NIH ChestX-ray14 under ``root`` (see :class:`corex_cxr.nih.NihSource`)."""
    from corex_cxr.nih import NihSource

    return NihSource(root=root, image_size=image_size, seed=seed, cache_dir=cache_dir, on_bad_sample=on_bad_sample,
                     val_fraction=val_fraction, test_fraction=test_fraction, folds=folds, fold=fold, workers=workers)


def chexpert_source(
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
) -> DataSource:
    """CheXpert under ``root`` (see :class:`corex_cxr.chexpert.ChexpertSource`)."""
    from corex_cxr.chexpert import ChexpertSource

    return ChexpertSource(root=root, image_size=image_size, seed=seed, cache_dir=cache_dir, uncertain=uncertain,
                          views=views, on_bad_sample=on_bad_sample, val_fraction=val_fraction,
                          test_fraction=test_fraction, folds=folds, fold=fold, workers=workers)


@hookimpl
def corex_datasets():
    return {"siim": siim_source, "folder": folder_source, "phantom": phantom_source, "nih_cxr14": nih_source,
            "chexpert": chexpert_source}


__getattr__ = lazy_exports(__name__, {
    "CxrSource": "corex_cxr.source",
    "Sample": "corex_cxr.source",
    "SiimSource": "corex_cxr.siim",
    "FolderSource": "corex_cxr.folder",
    "NihSource": "corex_cxr.nih",
    "ChexpertSource": "corex_cxr.chexpert",
    "Meta": "corex_cxr.metadata",
    "write_siim_phantom": "corex_cxr.phantom",
    # Building blocks for other plugins (corex_predict decodes files exactly as the cache does).
    "FULL_SCALE": "corex_cxr.cache",
    "decode_to_cache": "corex_cxr.cache",
    "read_header": "corex_cxr.dicom",
    "read_image": "corex_cxr.images",
    "PICTURE_SUFFIXES": "corex_cxr.images",
})
__all__ = [
    "CLASS_NAMES",
    "FULL_SCALE",
    "PICTURE_SUFFIXES",
    "BadSamplePolicy",
    "ChexpertSource",
    "CxrSource",
    "DataError",
    "FolderSource",
    "Meta",
    "NihSource",
    "Sample",
    "SiimSource",
    "chexpert_source",
    "corex_cli",
    "corex_datasets",
    "decode_to_cache",
    "folder_source",
    "nih_source",
    "phantom_source",
    "printable",
    "read_header",
    "read_image",
    "siim_source",
    "write_siim_phantom",
]
