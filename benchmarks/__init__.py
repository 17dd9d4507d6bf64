"""Benchmarks of recon_plugin (scripts, not tests; not part of the installed package).

Each writes its table to ``docs/BENCHMARKS.md``; run them as ``recon-plugin bench WHAT`` from a
source checkout, or ``python -m benchmarks WHAT``. The product package never imports this one.
"""
