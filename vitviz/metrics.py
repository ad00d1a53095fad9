"""``vitviz.metrics`` is the evaluation package :mod:`vitviz.evaluate` under its public name (kept, not deprecated)."""

import sys

from . import evaluate as _evaluate

sys.modules[__name__] = _evaluate
