"""Header text and numbers -> valid DICOM values (VR rules: CS, PN, DA, TM, DS, UID)."""

from __future__ import annotations

import datetime as _dt
import re

from pydicom.valuerep import format_number_as_ds

_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def _text(value: object, max_len: int) -> str:
    """Header text -> a single DICOM string value (no backslash/control chars, length-capped)."""
    s = _CONTROL.sub(" ", "" if value is None else str(value)).strip()
    return s[:max_len].rstrip()


def _cs(value: object, max_len: int = 16) -> str:
    """Code String: upper case letters, digits, space and underscore."""
    s = re.sub(r"[^A-Z0-9 _]", "_", _text(value, 64).upper())
    return s[:max_len].strip()


def _pn(value: object) -> str:
    """Person Name: keep ``^``/``=`` component separators, cap every component at 64 chars."""
    s = _CONTROL.sub(" ", "" if value is None else str(value)).strip()
    groups = s.split("=")[:3]
    return "=".join("^".join(c.strip()[:64] for c in g.split("^")[:5]) for g in groups)


def _da(value: object) -> str:
    """ISMRMRD xs:date ``YYYY-MM-DD`` or ``YYYYMMDD`` -> DICOM DA, else empty."""
    digits = re.sub(r"[^0-9]", "", str(value or ""))
    if len(digits) != 8:
        return ""
    try:
        _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return ""
    return digits


def _tm(value: object) -> str:
    """ISMRMRD xs:time ``HH:MM:SS[.ffffff]`` -> DICOM TM, else empty."""
    m = re.fullmatch(r"(\d\d):?(\d\d)(?::?(\d\d)(\.\d{1,6})?)?", str(value or "").strip())
    if not m:
        return ""
    hh, mm, ss, frac = m.group(1), m.group(2), m.group(3) or "00", m.group(4) or ""
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        return ""
    return hh + mm + ss + frac


def _ds(x: float) -> str:
    """A float as a Decimal String of at most 16 characters."""
    return format_number_as_ds(float(x) + 0.0)  # + 0.0 turns -0.0 into 0.0


# the field strengths magnets are sold by (T); DICOM's MagneticFieldStrength is the nominal one
NOMINAL_FIELDS_T = (0.2, 0.35, 0.55, 1.0, 1.5, 3.0, 4.0, 5.0, 7.0, 9.4, 10.5, 11.7, 14.0)


def nominal_field_t(tesla: float) -> float:
    """The nominal field strength of a magnet whose actual field is ``tesla`` (a 3 T Siemens
    system reports 2.89362): the nearest of ``NOMINAL_FIELDS_T`` within 5 %, else ``tesla``."""
    nearest = min(NOMINAL_FIELDS_T, key=lambda f: abs(f - tesla))
    return nearest if abs(nearest - tesla) <= 0.05 * nearest else float(tesla)


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _valid_uid(value: str) -> str | None:
    """``value`` if it is a syntactically valid UID (PS3.5 9.1), else None."""
    value = (value or "").strip().rstrip("\x00")
    return value if len(value) <= 64 and _UID_RE.fullmatch(value) else None


def _short_hash(h: str, n: int = 8) -> str:
    return re.sub(r"[^0-9a-fA-F]", "", h or "")[:n].lower()
