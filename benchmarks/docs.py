"""Writing benchmark tables into ``docs/BENCHMARKS.md``."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, heading: str, text: str) -> None:
    """Replace, where it stands, the section starting at ``heading`` in a markdown file (or
    append it)."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n\nNumbers measured on this " \
        "project's 2-core CPU machine; each section says the command that reproduces it.\n\n"
    if heading not in old:
        path.write_text(old.rstrip() + "\n\n" + text.strip() + "\n")
        return
    start = old.index(heading)
    nxt = old.find("\n## ", start + 1)
    rest = "\n\n" + old[nxt + 1:].strip() + "\n" if nxt >= 0 else "\n"
    path.write_text(old[:start] + text.strip() + rest)
