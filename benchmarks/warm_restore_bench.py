"""``python -m benchmarks.warm_restore_bench``: warm restore against ``dcp.load`` and the read ceiling (see ``distckpt.bench.warm_restore``)."""

import sys

from distckpt.bench.warm_restore import main

if __name__ == "__main__":
    sys.exit(main())
