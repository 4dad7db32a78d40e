"""``python -m embedcache`` and ``accelerate launch -m embedcache``."""

import sys

from embedcache.cli import main

sys.exit(main())
