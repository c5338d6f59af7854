"""``python -m tmjax``: the ``tmjax`` command."""

import sys

from tmjax.cli import main

sys.exit(main())
