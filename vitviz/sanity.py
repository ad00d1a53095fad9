"""Deprecated alias of :mod:`vitviz.evaluate.sanity` (moved there in 0.2); removed in the next release."""

import sys
import warnings

from .evaluate import sanity as _moved

warnings.warn("vitviz.sanity moved to vitviz.evaluate.sanity; import it from there "
              "(this alias goes in the next release)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
