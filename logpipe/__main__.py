"""``python -m logpipe`` (same as the ``logpipe`` console script)."""

import sys

from logpipe.cli import main

sys.exit(main())
