"""``python -m benchmarks.storage_bench``: throughput per storage backend (see ``distckpt.bench_storage``)."""

import sys

from distckpt.bench_storage import main

if __name__ == "__main__":
    sys.exit(main())
