"""``python -m benchmarks.memory_bench``: the memory tier with peer replicas (see ``distckpt.bench.memory``)."""

import sys

from distckpt.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
