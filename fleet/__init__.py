"""Field tests on one machine: simulated fleets, partitioners, baselines, reports.

A simulated fleet packs many devices onto a few cores: one BLAS thread each, or thread
oversubscription makes numpy about 100x slower (DESIGN.md, Concurrency). Set here, before
anything in this package imports numpy; a value the user exported wins.
"""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
