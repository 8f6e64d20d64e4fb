"""``python -m sparsefedpp.tools``: the same as the ``sparsefedpp`` command."""

import sys

from .cli import main

sys.exit(main())
