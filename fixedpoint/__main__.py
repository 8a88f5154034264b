"""``python -m fixedpoint``: the same as the ``fixedpoint`` command."""

import sys

from fixedpoint.cli import main

sys.exit(main())
