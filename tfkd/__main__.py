"""``python -m tfkd`` is ``python -m tfkd.train``."""

import sys

from tfkd.train import main

sys.exit(main())
