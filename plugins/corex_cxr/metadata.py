"""Per-image metadata for subgroup analysis: DICOM headers or CSV columns to a few plain fields.

Every item a corex_cxr source serves carries ``meta``, a dict of str to str with exactly the
fields of :data:`FIELDS`, ``""`` where unknown:

==============  ===========================================================================
``sex``         ``F``, ``M``, ``O`` (PatientSex; ``Female``/``Male`` in a CSV) or ``""``
``age_band``    ``0-17``, ``18-39``, ``40-59``, ``60-79``, ``80+`` (PatientAge ``065Y``,
                ``006M``, ``010W``, ``003D``; a CSV age in years) or ``""``
``view``        ViewPosition upper-cased: ``AP``, ``PA``, ``LL``, ``LATERAL`` ...
``manufacturer``  Manufacturer as written, stripped
``modality``    ``CR``, ``DX`` ...
``portable``    ``yes`` when a description, the comments or the station name has the word
                PORTABLE, PORT, PORTATIL (Spanish, accents ignored), MOBILE or BEDSIDE; ``no``
                when the series, study or protocol is described without one; ``""`` when
                nothing is recorded
``body_part``   BodyPartExamined upper-cased
==============  ===========================================================================

Pure and light (no pydicom, numpy or torch): a header is anything with ``.get(keyword, default)``,
a pydicom ``Dataset`` or a plain dict. Nothing here raises on odd values; they become ``""``.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FIELDS = ("sex", "age_band", "view", "manufacturer", "modality", "portable", "body_part")
AGE_BANDS = ((18, "0-17"), (40, "18-39"), (60, "40-59"), (80, "60-79"), (float("inf"), "80+"))
MAX_AGE = 120  # a larger age is a typing error (the NIH CSV has a few 400-year-olds)
PORTABLE_WORDS = frozenset({"PORTABLE", "PORT", "PORTATIL", "MOBILE", "BEDSIDE"})
DESCRIPTIONS = ("SeriesDescription", "StudyDescription", "ProtocolName")  # say "no" when present
SEX = {"F": "F", "FEMALE": "F", "M": "M", "MALE": "M", "O": "O", "OTHER": "O"}
YES, NO = ("YES", "Y", "TRUE", "1", "PORTABLE"), ("NO", "N", "FALSE", "0")
AGE_UNITS = {"Y": 1.0, "M": 12.0, "W": 52.18, "D": 365.25}


@dataclass(frozen=True)
class Meta:
    """The metadata of one image (see the module docstring)."""

    sex: str = ""
    age_band: str = ""
    view: str = ""
    manufacturer: str = ""
    modality: str = ""
    portable: str = ""
    body_part: str = ""

    def as_dict(self) -> dict[str, str]:
        return {field: getattr(self, field) for field in FIELDS}

    def merged(self, other: Meta) -> Meta:
        """This, with its unknown fields taken from ``other``."""
        return Meta(**{field: getattr(self, field) or getattr(other, field) for field in FIELDS})


def from_header(header: Any) -> Meta:
    """A DICOM header's metadata (``header`` as read by :func:`corex_cxr.dicom.read_header`)."""
    return Meta(
        sex=parse_sex(_text(header, "PatientSex")),
        age_band=age_band(dicom_age(_text(header, "PatientAge"))),
        view=_text(header, "ViewPosition").upper(),
        manufacturer=_text(header, "Manufacturer"),
        modality=_text(header, "Modality").upper(),
        portable=header_portable(header),
        body_part=_text(header, "BodyPartExamined").upper(),
    )


def from_columns(row: Mapping[str, str]) -> Meta:
    """Metadata from CSV columns ``sex``, ``age`` (years), ``view``, ``manufacturer``, ``modality``,
    ``portable`` (yes/no, true/false, 1/0) and ``body_part``; absent columns give ``""``."""
    def value(column: str) -> str:
        return (row.get(column) or "").strip()

    return Meta(
        sex=parse_sex(value("sex")),
        age_band=age_band(years(value("age"))),
        view=value("view").upper(),
        manufacturer=value("manufacturer"),
        modality=value("modality").upper(),
        portable=parse_flag(value("portable")),
        body_part=value("body_part").upper(),
    )


def parse_sex(text: str) -> str:
    return SEX.get(text.strip().upper(), "")


def dicom_age(text: str) -> float | None:
    """PatientAge (``nnnY``, ``nnnM``, ``nnnW`` or ``nnnD``) in years; None when malformed."""
    match = re.fullmatch(r"(\d{1,3})\s*([YMWD])", text.strip().upper())
    return int(match[1]) / AGE_UNITS[match[2]] if match else None


def years(text: str) -> float | None:
    """A CSV age: years as a number (``58``, ``58.0``), or a DICOM age string."""
    try:
        return float(text)
    except ValueError:
        return dicom_age(text)


def age_band(age: float | None) -> str:
    if age is None or not 0 <= age <= MAX_AGE:  # also NaN
        return ""
    return next(band for limit, band in AGE_BANDS if age < limit)


def header_portable(header: Any) -> str:
    described = [_text(header, keyword) for keyword in DESCRIPTIONS]
    others = [_text(header, keyword) for keyword in ("ImageComments", "StationName")]
    if any(PORTABLE_WORDS & _words(text) for text in described + others):
        return "yes"
    return "no" if any(described) else ""


def parse_flag(text: str) -> str:
    text = text.strip().upper()
    return "yes" if text in YES else "no" if text in NO else ""


def subgroup_counts(metas: Iterable[Meta]) -> dict[str, dict[str, int]]:
    """Images per value of every field (``""`` = unknown), values sorted."""
    counts = {field: Counter() for field in FIELDS}
    for meta in metas:
        for field in FIELDS:
            counts[field][getattr(meta, field)] += 1
    return {field: dict(sorted(counter.items())) for field, counter in counts.items()}


def _words(text: str) -> set[str]:
    """Upper-case words of letters, accents dropped: ``"Tórax PORTÁTIL_2"`` -> {TORAX, PORTATIL}."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().upper()
    return set(re.split(r"[^A-Z]+", plain)) - {""}


def _text(header: Any, keyword: str) -> str:
    try:
        value = header.get(keyword, "")
    except Exception:  # a damaged element: pydicom decodes lazily
        return ""
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, str):  # a multi-valued element
        value = "\\".join(map(str, value))
    return str(value).strip()


__all__ = ["AGE_BANDS", "FIELDS", "Meta", "age_band", "dicom_age", "from_columns", "from_header", "subgroup_counts"]
