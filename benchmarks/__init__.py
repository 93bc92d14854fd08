"""Benchmarks: ``python -m benchmarks`` runs the suite (:mod:`benchmarks.suite`: every preset at equal iterations and
equal wall-clock, framework overhead and memory against the bare model work, scaling sweeps); ``benchmarks.windows``,
``benchmarks.branching`` and ``benchmarks.guard_study`` are focused studies; ``benchmarks.probe`` measures one
iteration; ``benchmarks.common`` holds the run setup they share. Not imported by flowrl."""
