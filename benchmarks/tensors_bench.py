"""``python -m benchmarks.tensors_bench``: the many-small-tensors benchmark (see ``distckpt.bench.tensors``)."""

import sys

from distckpt.bench.tensors import main

if __name__ == "__main__":
    sys.exit(main())
