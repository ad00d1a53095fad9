"""Deprecated alias of :mod:`vitviz.batch` (moved there in 0.2); removed in the next release."""

import sys
import warnings

from . import batch as _moved

warnings.warn("vitviz.engine moved to vitviz.batch; import it from there "
              "(this alias goes in the next release)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
