"""``python -m promgate.workers``: one worker process, started by its supervisor."""

import sys

from promgate.workers.worker import main

sys.exit(main())
