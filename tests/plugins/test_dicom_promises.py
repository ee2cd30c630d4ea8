"""The promises of corex_cxr.dicom at their edges (issue 23: the survivors of mutation testing):
windowing by the standard's formulas, constant images, multi-valued windows, the header info,
damaged files as messages, boxes at the image border, resizing extreme shapes, and write_dicom's
own contract (it makes the test data of the whole suite)."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest
from corex_cxr.dicom import boxes_to_mask, read_dicom, read_header, resize_pad, write_dicom
from pydicom.multival import MultiValue
from pydicom.valuerep import DSfloat

from corex.errors import CorexError


def ramp(rows: int = 8, columns: int = 16) -> np.ndarray:
    return (np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns) * 10)


def test_sigmoid_windowing_follows_the_standards_formula(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "s.dcm", stored, window=(600.0, 400.0), headers={"VOILUTFunction": "SIGMOID"})
    image, info = read_dicom(path)
    expected = 1.0 / (1.0 + np.exp(-4.0 * (stored.astype(np.float64) - 600.0) / 400.0))
    assert info["voi"] == "window-sigmoid"
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-6)
    assert image[stored == 600].item() == pytest.approx(0.5)


@pytest.mark.parametrize("function, width, ok", [("LINEAR", 1.0, False), ("LINEAR", 1.5, True), ("LINEAR_EXACT", 0.0, False),
                                                  ("LINEAR_EXACT", 0.5, True), ("SIGMOID", 0.0, False), ("SIGMOID", 0.25, True)])
def test_the_smallest_window_width_of_each_function(tmp_path, function, width, ok):
    path = write_dicom(tmp_path / "w.dcm", ramp(), window=(600.0, width), headers={"VOILUTFunction": function})
    if ok:
        image, info = read_dicom(path)
        assert info["voi"] == f"window-{function.lower()}" and np.isfinite(image).all()
    else:
        with pytest.raises(CorexError, match=f"Window Width {width:g} is too small for {function} windowing"):
            read_dicom(path)


def test_a_window_needs_both_its_center_and_its_width(tmp_path):
    path = write_dicom(tmp_path / "c.dcm", ramp(), headers={"WindowCenter": 600.0})
    assert read_dicom(path)[1]["voi"] == "percentile"


def test_a_multi_valued_window_uses_the_first_pair(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "m.dcm", stored, headers={"WindowCenter": MultiValue(DSfloat, ["600", "100"]),
                                                              "WindowWidth": MultiValue(DSfloat, ["401", "50"])})
    image, info = read_dicom(path)
    expected = np.clip((stored - 599.5) / 400.0 + 0.5, 0, 1)
    assert info["voi"] == "window-linear"
    np.testing.assert_allclose(image, expected, atol=1e-6)
    bad = write_dicom(tmp_path / "n.dcm", stored, headers={"WindowCenter": MultiValue(DSfloat, ["600", "nan"]), "WindowWidth": 400})
    with pytest.raises(CorexError, match="WindowCenter is not a finite number"):
        read_dicom(bad)


def test_a_nearly_constant_image_falls_back_to_its_full_range_and_a_constant_one_is_refused(tmp_path):
    stored = np.full((64, 64), 100, dtype=np.uint16)
    stored[0, 0] = 200  # the 0.5-99.5 percentiles see only 100s: the full range 100..200 is used
    image, info = read_dicom(write_dicom(tmp_path / "n.dcm", stored))
    assert info["voi"] == "percentile" and image[0, 0] == 1.0 and image[1, 1] == 0.0
    with pytest.raises(CorexError, match=r"every pixel has the same value \(100\)"):
        read_dicom(write_dicom(tmp_path / "c.dcm", np.full((8, 8), 100, dtype=np.uint16)))
    lut = np.full(4096, 7, dtype=np.uint16)
    with pytest.raises(CorexError, match=r"its VOI LUT is constant \(7\)"):
        read_dicom(write_dicom(tmp_path / "l.dcm", ramp(), voi_lut=lut))


def test_the_info_describes_the_file(tmp_path):
    stored = ramp(8, 16).astype(np.uint16)
    image, info = read_dicom(write_dicom(tmp_path / "i.dcm", stored, bits_stored=12))
    assert image.shape == (8, 16) and image.dtype == np.float32
    assert (info["rows"], info["columns"], info["bits_stored"], info["photometric"]) == (8, 16, 12, "MONOCHROME2")
    path = write_dicom(tmp_path / "nb.dcm", stored)
    ds = pydicom.dcmread(path)
    del ds.BitsStored
    ds.save_as(path)
    with pytest.raises(CorexError):  # no BitsStored: pydicom cannot decode the pixels
        read_dicom(path)


def test_an_empty_number_of_frames_is_one_frame(tmp_path):
    path = write_dicom(tmp_path / "f.dcm", ramp(), headers={"NumberOfFrames": None})
    assert read_dicom(path)[0].shape == (8, 16)
    two = write_dicom(tmp_path / "two.dcm", ramp(), headers={"NumberOfFrames": 2})
    with pytest.raises(CorexError, match="has 2 frames"):
        read_dicom(two)


def test_damaged_files_are_messages_naming_the_file(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "d.dcm", ramp())
    data = path.read_bytes()
    for name, content in (("short.dcm", data[:200]), ("garbage.dcm", b"\x00" * 128 + b"DICM" + b"\x07" * 64)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CorexError, match=name):
            read_dicom(tmp_path / name)

    def torn(*args, **kwargs):
        raise OSError("unexpected end of file")

    with monkeypatch.context() as patch:  # pydicom raises many kinds of error on damaged headers
        patch.setattr("corex_cxr.dicom.pydicom.dcmread", torn)
        with pytest.raises(CorexError, match=r"corrupt or truncated DICOM header \(OSError: unexpected end of file\)"):
            read_header(path)
        with pytest.raises(CorexError, match=r"corrupt or truncated DICOM file \(OSError: unexpected end of file\)"):
            read_dicom(path)

    def failing(*args, **kwargs):
        raise ValueError("the LUT is malformed.\nDetails follow")

    monkeypatch.setattr("corex_cxr.dicom.apply_modality_lut", failing)
    with pytest.raises(CorexError, match=r"modality or VOI transform failed \(ValueError: the LUT is malformed\)"):
        read_dicom(path)

    def silent(*args, **kwargs):
        raise KeyError()

    monkeypatch.setattr("corex_cxr.dicom.apply_modality_lut", silent)
    with pytest.raises(CorexError, match=r"modality or VOI transform failed \(KeyError\)"):
        read_dicom(path)


@pytest.mark.parametrize("box, inside", [
    ((8.0, 2.0, 3.0, 3.0), False), ((2.0, 8.0, 3.0, 3.0), False),  # starting at the right or bottom edge: outside
    ((-3.0, 2.0, 3.0, 3.0), False), ((2.0, -3.0, 3.0, 3.0), False),  # ending at the left or top edge: outside
    ((7.6, 7.6, 5.0, 5.0), True), ((-2.9, -2.9, 3.0, 3.0), True),  # just inside: one pixel at least
])
def test_boxes_at_the_border_of_the_image(box, inside):
    mask = boxes_to_mask([box], 8)
    assert mask.sum() == (1.0 if inside else 0.0), mask
    if inside:
        corner = (7, 7) if box[0] > 0 else (0, 0)
        assert mask[corner] == 1.0


def test_resizing_a_line_keeps_at_least_one_pixel_and_values_stay_in_the_unit_range():
    for shape in ((1, 600), (600, 1)):
        square, scale, (pad_x, pad_y) = resize_pad(np.ones(shape, dtype=np.float32), 32)
        assert square.shape == (32, 32) and square.sum() == pytest.approx(32.0)
    checker = (np.indices((9, 9)).sum(0) % 2).astype(np.float32) * 1.5  # overshooting values are clipped
    assert resize_pad(checker, 32)[0].max() == 1.0


def test_write_dicom_refuses_what_it_cannot_write_and_writes_what_it_is_given(tmp_path):
    with pytest.raises(ValueError, match="2-d uint8 or uint16"):
        write_dicom(tmp_path / "f.dcm", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="2-d uint8 or uint16"):
        write_dicom(tmp_path / "3d.dcm", np.zeros((2, 4, 4), dtype=np.uint8))
    path = write_dicom(tmp_path / "h.dcm", ramp().astype(np.uint16), bits_stored=12, study_uid="1.2.3.4",
                       headers={"PatientSex": "F", "ViewPosition": "PA"})
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == "1.2.3.4" and ds.PatientSex == "F" and ds.ViewPosition == "PA"
    assert (ds.BitsStored, ds.HighBit) == (12, 11)
    other = pydicom.dcmread(write_dicom(tmp_path / "o.dcm", ramp()))
    assert other.StudyInstanceUID != ds.StudyInstanceUID and other.StudyInstanceUID != other.SeriesInstanceUID
    assert math.isclose(float(other.BitsStored), 16)


def test_a_wide_image_without_a_window_is_normalised_from_a_subsample(tmp_path):
    stored = (np.arange(1100, dtype=np.uint16)[None, :] * np.ones((4, 1), dtype=np.uint16))  # wider than 1024: subsampled
    image, info = read_dicom(write_dicom(tmp_path / "wide.dcm", stored))
    assert info["voi"] == "percentile" and image.shape == (4, 1100)
    assert image[0, 0] == 0.0 and image[0, -1] == 1.0 and np.all(np.diff(image[0]) >= 0)
