"""``python -m benchmarks.save_bench``: the save/restore benchmark (see ``distckpt.bench``)."""

import sys

from distckpt.bench import main

if __name__ == "__main__":
    sys.exit(main())
