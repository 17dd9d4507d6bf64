"""Header text and numbers -> valid DICOM values (VR rules: CS, PN, DA, TM, DS, UID)."""

from __future__ import annotations

import datetime as _dt
import logging
import re

from pydicom.valuerep import format_number_as_ds

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def _fit(s: str, max_len: int) -> str:
    """The longest prefix of ``s`` whose UTF-8 encoding (SpecificCharacterSet ISO_IR 192) is at
    most ``max_len`` bytes, never cutting a character. DICOM counts the limits of LO / SH / PN /
    ST / LT in characters, but validators (dciodvfy) and many PACS databases count bytes: a
    64-character ``Müller...`` name of 70 bytes is rejected or cut mid-character there."""
    raw = s.encode("utf-8")
    if len(raw) <= max_len:
        return s
    return raw[:max_len].decode("utf-8", errors="ignore")


def text_value(value: object, max_len: int) -> str:
    """Header text -> a single DICOM string value (no backslash/control chars, capped at
    ``max_len`` UTF-8 bytes, see :func:`_fit`)."""
    s = _CONTROL.sub(" ", "" if value is None else str(value)).strip()
    return _fit(s, max_len).rstrip()


def cs_value(value: object, max_len: int = 16) -> str:
    """Code String: upper case letters, digits, space and underscore."""
    s = re.sub(r"[^A-Z0-9 _]", "_", text_value(value, 64).upper())
    return s[:max_len].strip()


def _as_given(value: object, max_len: int) -> tuple[str, bool]:
    """(the header's text, stripped; whether DICOM can hold it unchanged: at most ``max_len``
    characters, no backslash or control character)."""
    s = "" if value is None else str(value).strip()
    return s, len(s) <= max_len and not _CONTROL.search(s)


def identifier_value(value: object, max_len: int, name: str) -> str:
    """An identifier (PatientID) exactly as the header gives it: shortened, or with a
    backslash or control character replaced, it could name another patient, so a value that
    does not fit raises ValueError naming it instead."""
    s, fits = _as_given(value, max_len)
    if not fits:
        raise ValueError(f"{name} {s[:80]!r} ({len(s)} characters) cannot be written as DICOM "
                         f"(at most {max_len} characters, no backslash or control character); "
                         "a changed identifier could name another patient, so nothing is "
                         "written: correct it in the raw data's header")
    return s


def reference_value(value: object, max_len: int, name: str) -> str:
    """A reference to an order (AccessionNumber): as given, or empty with a warning where it
    does not fit (shortened, it could match another order)."""
    s, fits = _as_given(value, max_len)
    if not fits:
        log.warning("%s %r (%d characters) does not fit DICOM (at most %d, no backslash or "
                    "control character): written empty, not shortened", name, s[:80], len(s),
                    max_len)
        return ""
    return s


def pn_value(value: object, name: str = "person name") -> str:
    """Person Name: ``^`` components in up to three ``=`` groups (alphabetic, ideographic,
    phonetic), each group at most 64 UTF-8 bytes (:func:`_fit`; components shortened, with a
    warning)."""
    s = _CONTROL.sub(" ", "" if value is None else str(value)).strip()
    groups = []
    for g in s.split("=")[:3]:
        parts = [c.strip() for c in g.split("^")[:5]]
        while (excess := len("^".join(parts).encode("utf-8")) - 64) > 0:
            i = max(range(len(parts)), key=lambda k: len(parts[k].encode("utf-8")))
            size = len(parts[i].encode("utf-8"))  # shorten the longest component
            parts[i] = _fit(parts[i], max(size - excess, 0)).rstrip()
        groups.append("^".join(parts).rstrip("^"))
    out = "=".join(groups)
    if out.replace(" ", "").rstrip("^=") != s.replace(" ", "").rstrip("^="):
        log.warning("%s %r shortened to DICOM's 64 bytes (UTF-8) per name group: %r", name,
                    s[:200], out)
    return out


def _dropped(name: str | None, value: object, what: str) -> str:
    if name and str(value or "").strip():
        log.warning("%s %r is not %s: written empty", name, str(value)[:80], what)
    return ""


def da_value(value: object, name: str | None = None) -> str:
    """ISMRMRD xs:date ``YYYY-MM-DD`` or ``YYYYMMDD`` -> DICOM DA, else empty (with a warning
    naming the attribute, where ``name`` is given and there was a value)."""
    digits = re.sub(r"[^0-9]", "", str(value or ""))
    if len(digits) != 8:
        return _dropped(name, value, "a date (YYYY-MM-DD)")
    try:
        _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return _dropped(name, value, "a date (YYYY-MM-DD)")
    return digits


def tm_value(value: object, name: str | None = None) -> str:
    """ISMRMRD xs:time ``HH:MM:SS[.fraction]`` -> DICOM TM (fraction cut to 6 digits), else
    empty (with a warning, as :func:`da_value`)."""
    m = re.fullmatch(r"(\d\d):?(\d\d)(?::?(\d\d)(\.\d+)?)?", str(value or "").strip())
    if not m:
        return _dropped(name, value, "a time (HH:MM:SS)")
    hh, mm, ss, frac = m.group(1), m.group(2), m.group(3) or "00", (m.group(4) or "")[:7]
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        return _dropped(name, value, "a time (HH:MM:SS)")
    return hh + mm + ss + frac


def ds_value(x: float) -> str:
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


def valid_uid(value: str) -> str | None:
    """``value`` if it is a syntactically valid UID (PS3.5 9.1), else None."""
    value = (value or "").strip().rstrip("\x00")
    return value if len(value) <= 64 and _UID_RE.fullmatch(value) else None


def short_hash(h: str, n: int = 8) -> str:
    return re.sub(r"[^0-9a-fA-F]", "", h or "")[:n].lower()
