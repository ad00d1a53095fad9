"""Deprecated alias of :mod:`vitviz.explain.captioning` (moved there in 0.2); removed in the next release."""

import sys
import warnings

from .explain import captioning as _moved

warnings.warn("vitviz.captioning moved to vitviz.explain.captioning; import it from there "
              "(this alias goes in the next release)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
