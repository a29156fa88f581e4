"""``python -m perps_indexer`` runs the command line."""

import sys

from perps_indexer.cli import main

sys.exit(main())
