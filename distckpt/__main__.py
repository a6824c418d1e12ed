"""``python -m distckpt``: the ``distckpt`` command line (see ``distckpt.cli``)."""

import sys

from .cli import main

sys.exit(main())
