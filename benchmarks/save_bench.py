"""``python -m benchmarks.save_bench``: the save/restore benchmark (see ``distckpt.bench.save``)."""

import sys

from distckpt.bench.save import main

if __name__ == "__main__":
    sys.exit(main())
