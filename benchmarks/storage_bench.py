"""``python -m benchmarks.storage_bench``: throughput per storage backend (see ``distckpt.bench.storage``)."""

import sys

from distckpt.bench.storage import main

if __name__ == "__main__":
    sys.exit(main())
