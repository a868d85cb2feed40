"""``python -m worker`` is ``streamserve``."""

import sys

from worker.cli import main

sys.exit(main())
