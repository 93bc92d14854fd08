"""``python -m benchmarks``: the benchmark suite (see :mod:`benchmarks.suite`, ``--help``)."""

from benchmarks.suite import main

raise SystemExit(main())
