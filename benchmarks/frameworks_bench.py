"""``python -m benchmarks.frameworks_bench``: each framework's own checkpointing vs distckpt (see ``distckpt.bench.frameworks``)."""

import sys

from distckpt.bench.frameworks import main

if __name__ == "__main__":
    sys.exit(main())
