"""corex_cxr.metadata: DICOM headers and CSV columns to the ``meta`` fields, on real headers."""

from __future__ import annotations

import pytest
from pydicom.data import get_testdata_file

from corex_cxr.dicom import read_header
from corex_cxr.metadata import FIELDS, Meta, age_band, dicom_age, from_columns, from_header, subgroup_counts, years


def real_header(name: str):
    path = get_testdata_file(name)  # pydicom's test files and the pydicom-data package
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return read_header(path)  # no pixels read


def test_a_real_chest_radiograph():
    # RG1_UNCR.dcm: a Philips CR chest PA; StudyDescription THORAX, no PatientAge.
    meta = from_header(real_header("RG1_UNCR.dcm"))
    assert meta == Meta(sex="F", age_band="", view="PA", manufacturer="Philips Medical Systems", modality="CR",
                        portable="no", body_part="CHEST")
    assert list(meta.as_dict()) == list(FIELDS)


def test_other_real_headers():
    # RG3_UNCR.dcm: an AP radiograph of the tibia on a Fuji CR.
    assert from_header(real_header("RG3_UNCR.dcm")) == Meta(
        sex="F", view="AP", manufacturer="FUJI PHOTO FILM CO. LTD.", modality="CR", portable="no", body_part="EXTREMITY")
    # CT_small.dcm: PatientSex O, PatientAge 000Y.
    ct = from_header(real_header("CT_small.dcm"))
    assert (ct.sex, ct.age_band, ct.modality, ct.manufacturer, ct.view) == ("O", "0-17", "CT", "GE MEDICAL SYSTEMS", "")
    # SC_rgb.dcm: 024Y, no Manufacturer, only ImageComments (which never says "no").
    sc = from_header(real_header("SC_rgb.dcm"))
    assert (sc.sex, sc.age_band, sc.manufacturer, sc.portable) == ("F", "18-39", "", "")
    # liver.dcm: 060Y, a SeriesDescription without the word portable.
    liver = from_header(real_header("liver.dcm"))
    assert (liver.sex, liver.age_band, liver.portable) == ("M", "60-79", "no")


@pytest.mark.parametrize(("text", "band"), [
    ("065Y", "60-79"), ("006M", "0-17"), ("017Y", "0-17"), ("018Y", "18-39"), ("039Y", "18-39"), ("040Y", "40-59"),
    ("059Y", "40-59"), ("079Y", "60-79"), ("080Y", "80+"), ("104Y", "80+"), ("010W", "0-17"), ("003D", "0-17"),
    ("", ""), ("Y", ""), ("abcY", ""), ("65", ""),
])
def test_dicom_age_bands(text, band):
    assert age_band(dicom_age(text)) == band


@pytest.mark.parametrize(("text", "band"), [
    ("58", "40-59"), ("58.0", "40-59"), ("0", "0-17"), ("90", "80+"), ("414", ""), ("-3", ""), ("nan", ""),
    ("", ""), ("unknown", ""), ("065Y", "60-79"),
])
def test_csv_age_bands(text, band):
    assert age_band(years(text)) == band


@pytest.mark.parametrize(("header", "portable"), [
    ({"SeriesDescription": "CHEST AP PORTABLE"}, "yes"),
    ({"SeriesDescription": "AP_PORTABLE"}, "yes"),
    ({"StudyDescription": "XR CHEST", "ImageComments": "bedside"}, "yes"),
    ({"ProtocolName": "Chest Mobile"}, "yes"),
    ({"StationName": "MOBILE_DR1"}, "yes"),
    ({"StationName": "ROOM3"}, ""),  # a station name alone says nothing either way
    ({"ImageComments": "Uncompressed"}, ""),
    ({"SeriesDescription": "XR CHEST PORT 1V"}, "yes"),
    ({"SeriesDescription": "Tórax PORTÁTIL"}, "yes"),  # as in the BIMCV part of SIIM
    ({"StationName": "PORT3"}, "yes"),
    ({"SeriesDescription": "CHEST PA"}, "no"),
    ({"SeriesDescription": "SUPPORTABLE"}, "no"),  # whole words only
    ({}, ""),
])
def test_portable(header, portable):
    assert from_header(header).portable == portable


def test_header_values_are_normalised():
    header = {"PatientSex": " m ", "ViewPosition": "ll", "Modality": "dx", "BodyPartExamined": "chest",
              "Manufacturer": "  GE Healthcare ", "PatientAge": None}
    assert from_header(header) == Meta(sex="M", view="LL", modality="DX", body_part="CHEST", manufacturer="GE Healthcare")
    assert from_header({"PatientSex": "X"}).sex == ""


def test_csv_columns():
    row = {"sex": "Female", "age": "71", "view": "pa", "manufacturer": " GE ", "modality": "dx", "portable": "TRUE",
           "body_part": "chest", "other": "x"}
    assert from_columns(row) == Meta("F", "60-79", "PA", "GE", "DX", "yes", "CHEST")
    assert from_columns({"portable": "0"}).portable == "no"
    assert from_columns({"path": "a.png"}) == Meta()


def test_merged_fills_only_unknown_fields():
    assert Meta(sex="F", view="").merged(Meta(sex="M", view="AP", modality="CR")) == Meta(sex="F", view="AP", modality="CR")


def test_subgroup_counts():
    counts = subgroup_counts([Meta(sex="F", view="AP"), Meta(sex="M", view="AP"), Meta(sex="F")])
    assert set(counts) == set(FIELDS)
    assert counts["sex"] == {"F": 2, "M": 1} and counts["view"] == {"": 1, "AP": 2}
    assert counts["modality"] == {"": 3}
