"""``python -m engine.cli``: the same as the ``modsync`` console script."""
import sys

from . import main

sys.exit(main())
