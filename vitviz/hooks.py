"""Deprecated alias of :mod:`vitviz.attention` (moved there in 0.2); removed in the next release."""

import sys
import warnings

from . import attention as _moved

warnings.warn("vitviz.hooks moved to vitviz.attention; import it from there "
              "(this alias goes in the next release)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
