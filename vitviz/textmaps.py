"""Deprecated alias of :mod:`vitviz.explain.text` (moved there in 0.2); removed in the next release."""

import sys
import warnings

from .explain import text as _moved

warnings.warn("vitviz.textmaps moved to vitviz.explain.text; import it from there "
              "(this alias goes in the next release)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
