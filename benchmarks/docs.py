"""Writing benchmark tables into ``docs/BENCHMARKS.md``."""

from __future__ import annotations

from pathlib import Path

HEADER = ("# Benchmarks\n\nNumbers measured on this project's 2-core CPU machine; each section "
          "says the command that reproduces it.\n")


def machine() -> str:
    """This machine in one phrase for timing sections: CPU model, its widest vector unit, CPU
    count, torch threads. Times (and pruning's speed-up ratios, which depend on how much of a
    pass the convolutions take) differ between machines: an AVX2-only CPU ran the unpruned
    network 5.8x slower than the AVX-512 one of earlier sessions (docs/FINDINGS.md)."""
    import os
    import platform

    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    vector = next((v for v in ("avx512f", "avx2", "avx", "neon", "asimd") if v in flags), None)
    return (f"{model}" + (f", {vector.upper()}" if vector else "") + f", {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads")


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
