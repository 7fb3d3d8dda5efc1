"""``python -m promgate`` is the ``promgate`` command."""

import sys

from promgate.cli import main

sys.exit(main())
