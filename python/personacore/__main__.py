"""``python -m personacore``: the same as the ``personacore`` command (see :mod:`personacore.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
