"""``python -m benchmarks.restore_bench``: restore at scale: bytes and requests per restore (see ``distckpt.bench.restore``)."""

import sys

from distckpt.bench.restore import main

if __name__ == "__main__":
    sys.exit(main())
