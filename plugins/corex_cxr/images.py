"""Any supported image file to float32 ``[0, 1]``, 0 = air: DICOM, PNG or JPEG.

PNG and JPEG files are taken to be display-ready already (white = dense, as exported by a
viewer): their values are divided by the largest value of their type (255, or 65535 for 16-bit
PNG) and colour images are converted to grey (ITU-R 601 luma). No windowing is applied.

A picture with more pixels than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``,
about 89 million; a radiograph has some 5 to 20 million) is not decoded: it is a bad sample like
any other (a :class:`DataError`, so ``on_bad_sample: skip`` lists it and ``error`` names it).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from corex_cxr.dicom import read_dicom
from corex_cxr.errors import DataError

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode by suffix: PNG/JPEG with Pillow, anything else as DICOM (``.dcm`` or none)."""
    path = Path(path)
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return read_picture(path)
    return read_dicom(path)


def read_picture(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an 8-bit or 16-bit grey, or colour, PNG/JPEG to float32 ``[0, 1]``."""
    try:
        with warnings.catch_warnings():  # over the limit (a warning) or over twice it (an error): not decoded either way
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                picture.load()
                mode = picture.mode
                if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNG, depending on the Pillow version
                    values, full_scale = np.asarray(picture).astype(np.float32), 65535.0
                else:
                    values, full_scale = np.asarray(picture.convert("L")).astype(np.float32), 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(path, f"not decoded, too many pixels for a radiograph: {error} (Pillow's decompression-bomb limit, "
                              f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})") from None
    except FileNotFoundError:
        raise DataError(path, "file does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(path, f"not a readable PNG/JPEG image ({type(error).__name__}: {error})") from None
    image = np.clip(values / full_scale, 0.0, 1.0)
    return image, {"rows": image.shape[0], "columns": image.shape[1], "mode": mode, "voi": "none"}
