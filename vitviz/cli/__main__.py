"""``python -m vitviz.cli``: the `vitviz` command."""

import sys

from ._main import main

sys.exit(main())
