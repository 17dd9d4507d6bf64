"""Writing benchmark tables into ``docs/BENCHMARKS.md``."""

from __future__ import annotations

from pathlib import Path

HEADER = ("# Benchmarks\n\nNumbers measured on this project's 2-core CPU machine; each section "
          "says the command that reproduces it.\n")


def replace_section(path: Path, heading: str, text: str, first: bool = False) -> None:
    """Replace, where it stands, the ``## `` section starting with ``heading`` in a markdown
    file; a new section goes first after the title when ``first``, else at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.is_file() else HEADER
    parts = old.split("\n## ")
    head, sections = parts[0], ["## " + p for p in parts[1:]]
    body = text.rstrip() + "\n"
    idx = next((i for i, s in enumerate(sections) if s.startswith(heading)), None)
    if idx is not None:
        sections[idx] = body
    elif first:
        sections.insert(0, body)
    else:
        sections.append(body)
    path.write_text("\n".join([head.rstrip() + "\n"] + [s.rstrip() + "\n" for s in sections]))
