"""normbench's asv benchmark suite (see benchmarks/README.md for how to run it).

asv imports this folder as the package ``benchmarks``; modules whose names start with
``bench_`` hold the benchmarks, ``_harness`` the shared machinery, and
``reference_<framework>`` the minimal hand-written training loops that each backend's
step time is compared with.
"""
