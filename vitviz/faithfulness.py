"""Deprecated alias of :mod:`vitviz.evaluate.faithfulness` (moved there in 0.2); removed in the next release."""

import sys
import warnings

from .evaluate import faithfulness as _moved

warnings.warn("vitviz.faithfulness moved to vitviz.evaluate.faithfulness; import it from there "
              "(this alias goes in the next release)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
