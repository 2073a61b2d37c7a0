"""``python -m dpcore`` runs the command line."""

import sys

from dpcore.cli import main

sys.exit(main())
