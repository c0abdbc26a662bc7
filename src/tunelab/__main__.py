"""``python -m tunelab``: the same as the ``tunelab`` command."""

import sys

from tunelab.cli import main

sys.exit(main())
