"""``python -m benchmarks.overlap_bench``: training time lost per save (see ``distckpt.bench.overlap``)."""

import sys

from distckpt.bench.overlap import main

if __name__ == "__main__":
    sys.exit(main())
