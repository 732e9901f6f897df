"""`python -m pipeline.ladders <name> [--size ...] [--list]`: train a registered ladder."""

import sys

from pipeline.ladders.ladder import main

sys.exit(main())
