"""Benchmarks of ``retrieval_lib``: measured speed and memory against simple references.

Run from the repository root::

    python -m benchmarks                 # everything (about 15 min on 2 cores, plus the suite)
    python -m benchmarks --quick         # small sizes, under 2 minutes: checks the scripts
    python -m benchmarks pooling search  # some of them

Modules, one per benchmark (each has ``run(quick, repeats) -> dict`` and
``to_markdown(result) -> str``): ``pooling``, ``extraction``, ``evaluation``, ``search``,
``scaling`` (also ``plot``) and ``suite``; ``timing`` holds the shared timers and memory
probes. Results go to ``benchmarks/results/`` (``--out``): one ``.json`` and ``.md`` per
benchmark, ``scaling.png``, and the combined ``results.md`` / ``results.json``.
"""
