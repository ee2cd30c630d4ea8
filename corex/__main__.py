"""``python -m corex``: the command line, as torchrun starts it (``torchrun ... -m corex run RECIPE``)."""

import sys

from corex.cli import main

sys.exit(main())
