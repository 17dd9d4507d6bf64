"""The raw files a command's inputs name: files as given, folders expanded to the raw files
in them (``recon``, ``inspect`` and ``adapt`` take their inputs alike)."""

from __future__ import annotations

from pathlib import Path

RAW_SUFFIXES = (".h5", ".hdf5", ".mrd", ".dat")  # .dat: Siemens twix


def gather_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded (sorted) to their raw-data files; the same file named
    twice is taken once. Missing paths raise FileNotFoundError."""
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in RAW_SUFFIXES
                           and q.is_file())
        elif p.exists():
            found = [p]
        else:
            raise FileNotFoundError(f"input {p} does not exist")
        for q in found:
            if q.resolve() not in seen:
                seen.add(q.resolve())
                out.append(q)
    return out


def raw_files(inputs: list[str | Path], error: type[ValueError] = ValueError) -> list[Path]:
    """:func:`gather_inputs`, refusing (``error``, a usage error: exit 2) inputs that hold no
    raw file at all."""
    files = gather_inputs(inputs)
    if not files:
        raise error(f"no raw files ({', '.join(RAW_SUFFIXES)}) in "
                    f"{' '.join(map(str, inputs))}")
    return files
