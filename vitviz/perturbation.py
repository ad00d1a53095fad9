"""Deprecated alias of :mod:`vitviz.evaluate.perturbation` (moved there in 0.2); removed in the next release."""

import sys
import warnings

from .evaluate import perturbation as _moved

warnings.warn("vitviz.perturbation moved to vitviz.evaluate.perturbation; import it from there "
              "(this alias goes in the next release)",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
