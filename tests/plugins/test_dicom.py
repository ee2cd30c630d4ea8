"""corex_cxr.dicom and corex_cxr.images: decoding to [0, 1] (0 = air), compressed syntaxes,
errors, and the resize + pad geometry shared by images and boxes."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

from corex_cxr.dicom import boxes_to_mask, read_dicom, read_header, resize_pad, transform_boxes, write_dicom
from corex_cxr.errors import DataError
from corex_cxr.images import read_image


def ramp(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth, non-constant test image in [0, 1] (rows x columns)."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x / (width - 1)) * 0.7 + (y / (height - 1)) * 0.3).astype(np.float64)


def stored(image: np.ndarray, bits: int) -> np.ndarray:
    return np.rint(image * (2**bits - 1)).astype(np.uint8 if bits <= 8 else np.uint16)


# -- the real radiograph ---------------------------------------------------------------------------


def test_real_radiograph_and_its_jpeg2000_twin_decode_alike_with_dark_lungs():
    plain, compressed = get_testdata_file("RG1_UNCR.dcm"), get_testdata_file("RG1_J2KR.dcm")
    np.testing.assert_array_equal(pydicom.dcmread(plain).pixel_array, pydicom.dcmread(compressed).pixel_array)

    image, info = read_dicom(plain)
    twin, twin_info = read_dicom(compressed)
    np.testing.assert_allclose(image, twin, atol=1e-6)
    assert info["photometric"] == "MONOCHROME1" and info["bits_stored"] == 15 and info["voi"] == "window-linear"
    assert twin_info["transfer_syntax"] == JPEG2000Lossless
    assert image.dtype == np.float32 and image.shape == (1955, 1841)
    assert 0.0 <= image.min() and image.max() <= 1.0

    # MONOCHROME1 inverted: air-filled lungs dark, mediastinum and spine bright (regions chosen by
    # looking at the 256 px image).
    square, _, _ = resize_pad(image, 256)
    mediastinum = square[30:180, 118:138].mean()
    left_lung, right_lung = square[35:90, 60:95].mean(), square[35:90, 150:185].mean()
    assert mediastinum > left_lung + 0.2 and mediastinum > right_lung + 0.2


# -- intensity pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 12, 15, 16])
def test_every_bit_depth_gives_the_same_normalised_image(tmp_path, bits):
    reference = ramp()
    path = write_dicom(tmp_path / "a.dcm", stored(reference, bits), bits_stored=bits)
    image, info = read_dicom(path)
    assert info["voi"] == "percentile" and info["bits_stored"] == bits
    # No VOI: the 0.5..99.5 percentile range of the ramp becomes [0, 1].
    low, high = np.percentile(reference, [0.5, 99.5])
    expected = np.clip((reference - low) / (high - low), 0, 1)
    np.testing.assert_allclose(image, expected, atol=2.5 / 2**bits + 1e-6)


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    reference = stored(ramp(), 12)
    window = (1500.0, 2000.0)
    normal = write_dicom(tmp_path / "m2.dcm", reference, bits_stored=12, window=window)
    inverted = write_dicom(tmp_path / "m1.dcm", reference, bits_stored=12, window=window, photometric="MONOCHROME1")
    image2, _ = read_dicom(normal)
    image1, _ = read_dicom(inverted)
    np.testing.assert_allclose(image1, 1.0 - image2, atol=1e-6)
    assert image2[0, 0] < 0.05 and image1[0, 0] > 0.95  # low stored values: dark in M2, bright in M1


def test_rescale_comes_before_the_window(tmp_path):
    values = stored(ramp(), 12)
    slope, intercept, center, width = 2.0, -1024.0, 1000.0, 3000.0
    path = write_dicom(tmp_path / "ct.dcm", values, bits_stored=12, rescale=(slope, intercept), window=(center, width))
    image, info = read_dicom(path)
    modality = values * slope + intercept
    expected = np.clip((modality - (center - 0.5)) / (width - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1
    assert info["voi"] == "window-linear"
    np.testing.assert_allclose(image, expected, atol=1e-6)


NOT_FINITE = [
    ("RescaleSlope", {"rescale": (float("nan"), 0.0)}),
    ("RescaleSlope", {"rescale": (float("-inf"), 0.0)}),
    ("RescaleIntercept", {"rescale": (1.0, float("inf"))}),
    ("WindowCenter", {"window": (float("nan"), 100.0)}),
    ("WindowWidth", {"window": (100.0, float("inf"))}),
]


@pytest.mark.parametrize("element, header", NOT_FINITE, ids=[f"{e}={next(iter(h.values()))}" for e, h in NOT_FINITE])
def test_a_nan_or_infinite_rescale_or_window_is_a_bad_file_not_a_black_image(tmp_path, element, header):
    path = write_dicom(tmp_path / "odd.dcm", stored(ramp(), 12), bits_stored=12, **header)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no anonymous numpy warning on the way
        with pytest.raises(DataError, match=f"{element} is not a finite number") as caught:
            read_dicom(path)
    assert caught.value.path == str(path)


def test_a_transform_that_overflows_is_a_bad_file(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", stored(ramp(), 12), bits_stored=12, rescale=(1e308, 0.0), window=(0.0, 100.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="not finite"):
            read_dicom(path)


def test_voi_lut_sequence_wins_over_the_window(tmp_path):
    values = stored(ramp(), 12)
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 3000 + 500).astype(np.uint16)  # a gamma curve
    path = write_dicom(tmp_path / "lut.dcm", values, bits_stored=12, voi_lut=lut, window=(10.0, 20.0))
    image, info = read_dicom(path)
    assert info["voi"] == "voi-lut"
    np.testing.assert_allclose(image, (lut[values] - 500.0) / 3000.0, atol=1e-6)


def test_robust_range_ignores_burned_in_text(tmp_path):
    values = np.full((48, 64), 1000, dtype=np.uint16) + stored(ramp(), 10)
    values[0, :5] = 65535  # a few saturated pixels, like a burned-in marker
    image, _ = read_dicom(write_dicom(tmp_path / "text.dcm", values))
    assert image[:, 40:].mean() > 0.6  # min-max would have squashed the body to below 0.02


# -- compressed transfer syntaxes ------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_lossless_compression_decodes_to_the_same_image(tmp_path, syntax):
    values, window = stored(ramp(), 12), (2000.0, 3000.0)
    plain, _ = read_dicom(write_dicom(tmp_path / "plain.dcm", values, bits_stored=12, window=window))
    compressed = write_dicom(tmp_path / "c.dcm", values, bits_stored=12, window=window, transfer_syntax=syntax)
    image, info = read_dicom(compressed)
    assert info["transfer_syntax"] == syntax
    np.testing.assert_array_equal(image, plain)


def test_jpeg_baseline_decodes_close_to_the_original(tmp_path):
    values = stored(ramp(), 8)
    plain, _ = read_dicom(write_dicom(tmp_path / "plain.dcm", values, window=(128.0, 256.0)))
    lossy = write_dicom(tmp_path / "j.dcm", values, window=(128.0, 256.0), transfer_syntax=JPEGBaseline8Bit)
    image, info = read_dicom(lossy)
    assert info["transfer_syntax"] == JPEGBaseline8Bit
    assert np.abs(image - plain).max() < 4 / 255  # lossy, quality 95


def test_jpeg_ls_and_jpeg_lossless_files_decode():
    # No JPEG-LS encoder here (pyjpegls is not installed): use pydicom's own test files.
    jpeg_ls, _ = read_dicom(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    plain, _ = read_dicom(get_testdata_file("MR_small.dcm"))
    np.testing.assert_array_equal(jpeg_ls, plain)
    lossless, info = read_dicom(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert info["transfer_syntax"] == "1.2.840.10008.1.2.4.70" and lossless.shape == (768, 1024)
    assert lossless.min() == 0.0 and lossless.max() == 1.0 and lossless.std() > 0.05


# -- errors ----------------------------------------------------------------------------------------


def test_unreadable_files_raise_data_errors_naming_file_and_reason(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", stored(ramp(), 12), bits_stored=12)
    data = good.read_bytes()
    cases = {
        "text.dcm": (b"patient,label\n1,typical\n", "not a DICOM file"),
        "truncated_pixels.dcm": (data[: len(data) - 3000], "pixel data cannot be decoded"),
        "truncated_header.dcm": (data[:400], "no pixel data"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=reason) as caught:
            read_dicom(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value) and caught.value.path == str(tmp_path / name)

    with pytest.raises(DataError, match="does not exist"):
        read_dicom(tmp_path / "missing.dcm")
    with pytest.raises(DataError, match="not a DICOM file"):
        read_header(tmp_path / "text.dcm")
    assert isinstance(DataError("x", "y"), ValueError)


def test_no_pixel_data_corrupt_stream_and_colour_are_refused(tmp_path):
    no_pixels = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", stored(ramp(), 12)))
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "no_pixels.dcm")
    with pytest.raises(DataError, match="has no pixel data"):
        read_dicom(tmp_path / "no_pixels.dcm")

    corrupt = pydicom.dcmread(write_dicom(tmp_path / "b.dcm", stored(ramp(), 12), transfer_syntax=JPEG2000Lossless))
    corrupt.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])
    corrupt.save_as(tmp_path / "corrupt.dcm")
    with pytest.raises(DataError, match="pixel data cannot be decoded"):
        read_dicom(tmp_path / "corrupt.dcm")

    colour = pydicom.dcmread(write_dicom(tmp_path / "c.dcm", stored(ramp(), 8)))
    colour.PhotometricInterpretation = "RGB"
    colour.save_as(tmp_path / "rgb.dcm")
    with pytest.raises(DataError, match="not grey-scale"):
        read_dicom(tmp_path / "rgb.dcm")


# -- pictures --------------------------------------------------------------------------------------


def test_pictures_8_and_16_bit_and_dispatch_by_suffix(tmp_path):
    reference = ramp()
    Image.fromarray(stored(reference, 16)).save(tmp_path / "deep.png")
    Image.fromarray(stored(reference, 8)).save(tmp_path / "flat.png")
    Image.fromarray(stored(reference, 8)).convert("RGB").save(tmp_path / "colour.jpg", quality=95)
    deep, info = read_image(tmp_path / "deep.png")
    assert info["mode"].startswith("I") and deep.dtype == np.float32
    np.testing.assert_allclose(deep, reference, atol=1 / 65535)
    np.testing.assert_allclose(read_image(tmp_path / "flat.png")[0], reference, atol=1 / 255)
    np.testing.assert_allclose(read_image(tmp_path / "colour.jpg")[0], reference, atol=4 / 255)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(DataError, match="not a readable PNG/JPEG"):
        read_image(tmp_path / "broken.png")


# -- geometry --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 64), (64, 48)])
def test_resize_pad_keeps_boxes_on_their_pixels(shape):
    image = np.zeros(shape, dtype=np.float32)
    box = (10.0, 8.0, 20.0, 12.0) if shape == (48, 64) else (8.0, 10.0, 12.0, 20.0)  # x, y, width, height
    x, y, w, h = map(int, box)
    image[y : y + h, x : x + w] = 1.0
    square, scale, pad = resize_pad(image, 32)
    assert square.shape == (32, 32) and scale == 0.5
    assert pad == ((0, 4) if shape == (48, 64) else (4, 0))
    mask = boxes_to_mask(transform_boxes([box], scale, pad), 32)
    bright = square > 0.5
    assert (mask.astype(bool) & bright).sum() / (mask.astype(bool) | bright).sum() > 0.9
    assert mask.sum() == (w * scale) * (h * scale)


def test_downsampling_is_antialiased():
    stripes = np.tile(np.array([1, 1, 0, 0], dtype=np.float32), (64, 16))  # period 4 px
    square, _, _ = resize_pad(stripes, 16)  # 4x smaller: every output pixel averages a period
    assert abs(square.mean() - 0.5) < 0.05 and square.std() < 0.1


def test_boxes_outside_the_image_are_clipped_or_dropped():
    mask = boxes_to_mask([(-5.0, -5.0, 10.0, 10.0), (40.0, 0.0, 5.0, 5.0), (30.0, 30.0, 0.2, 0.2)], 32)
    assert mask[:5, :5].all() and mask.sum() == 25 + 1  # clipped corner, nothing from x=40, 1 px minimum
