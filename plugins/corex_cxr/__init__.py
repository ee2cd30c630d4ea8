"""corex_cxr: chest X-ray data sources (SIIM-FISABIO-RSNA, image folders, the synthetic phantom).

Every source decodes its images once into a cache at the recipe's ``image_size`` and serves
patient-grouped, stratified splits; intensities are float32 in ``[0, 1]``, 0 = air (see
:mod:`corex_cxr.dicom` and docs/data.md).

=========  ==============================  =====================================================
name       factory                         data
=========  ==============================  =====================================================
siim       :class:`~corex_cxr.siim.SiimSource`       the competition's DICOMs and CSVs under ``root``
folder     :class:`~corex_cxr.folder.FolderSource`   PNG/JPEG/DICOM files plus a CSV of labels
phantom    :func:`phantom_source`                 synthetic radiographs written in the SIIM layout
=========  ==============================  =====================================================
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from corex import hookimpl
from corex_cxr.errors import DataError
from corex_cxr.folder import FolderSource
from corex_cxr.phantom import corex_cli, write_siim_phantom
from corex_cxr.siim import SiimSource
from corex_cxr.source import CLASS_NAMES, BadSamplePolicy, CxrSource, Sample, check_source_options
from corex_cxr.splits import check_split_options


def phantom_source(
    *,
    image_size: int,
    seed: int = 0,
    cache_dir: Path,
    studies: int = 400,
    difficulty: float = 0.5,
    label_noise: float = 0.0,
    size: int | None = None,
    on_bad_sample: BadSamplePolicy = "error",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int = 0,
    fold: int = 0,
    workers: int = 0,
) -> SiimSource:
    """The synthetic phantom (:mod:`corex_cxr.phantom`), read by the real SIIM loader.

    Written once to ``cache_dir/phantom/<settings>`` and reused. ``size`` is the side of the
    written DICOMs, by default ``2 * image_size`` so the loader really resizes.
    """
    # Checked before the (slow) writing, which they do not affect.
    check_source_options(image_size=image_size, on_bad_sample=on_bad_sample, workers=workers)
    check_split_options(val_fraction=val_fraction, test_fraction=test_fraction, folds=folds, fold=fold)
    size = 2 * image_size if size is None else size
    settings = {"studies": studies, "seed": seed, "size": size, "difficulty": difficulty, "label_noise": label_noise}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    root = Path(cache_dir).expanduser() / "phantom" / f"{studies}studies-seed{seed}-{size}px-{digest}"
    if not (root / "train_image_level.csv").is_file():
        write_siim_phantom(
            root, studies=studies, seed=seed, size=size, difficulty=difficulty, label_noise=label_noise
        )
    return SiimSource(
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


@hookimpl
def corex_datasets():
    return {"siim": SiimSource, "folder": FolderSource, "phantom": phantom_source}


__all__ = [
    "CLASS_NAMES",
    "CxrSource",
    "DataError",
    "FolderSource",
    "Sample",
    "SiimSource",
    "corex_cli",
    "corex_datasets",
    "phantom_source",
]
