"""``python -m distckpt``: the ``distckpt`` command line (see ``distckpt.tools.cli``)."""

import sys

from .tools.cli import main

sys.exit(main())
