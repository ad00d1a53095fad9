"""`vitviz.evaluate`: does a map point at what the model uses? Faithfulness and localisation metrics.

One namespace for the pure metrics of :mod:`vitviz.evaluate.metrics` (maps against
ground-truth masks), the deletion / insertion curves of :mod:`vitviz.evaluate.faithfulness`
(which run the model), token deletion and ROAD (:mod:`vitviz.evaluate.perturbation`), the
randomisation sanity checks (:mod:`vitviz.evaluate.sanity`, maps from the registry of
:mod:`vitviz.explain`) and the :class:`Table` their reports print.

Example:
    >>> import vitviz.evaluate as vm
    >>> vm.pointing_game(maps, masks).mean()          # maps [B, gh, gw], masks [B, H, W]
    >>> curves = vm.deletion_insertion(model, x, maps)
    >>> curves.deletion_auc.mean(), curves.insertion_auc.mean()
    >>> r = vm.randomization(model, x, "rollout")     # Adebayo et al. 2018: maps per re-initialised layer
    >>> vm.token_curves(model, x, maps).deletion_auc  # drop patch tokens instead of greying pixels
    >>> vm.road(model, x, maps).gap                   # ROAD: LeRF AUC - MoRF AUC
"""

from __future__ import annotations

from ._table import Table
from .faithfulness import Curves, deletion_insertion, gaussian_blur, substrate
from .metrics import (
                              average_ranks,
                              centre_prior,
                              curve_auc,
                              energy_pointing,
                              mask_auc,
                              mask_iou,
                              normalize_maps,
                              patch_counts,
                              patch_order,
                              pointing_game,
                              random_maps,
                              spearman,
                              ssim,
                              step_counts,
                              step_masks,
                              topk_overlap,
                              word_grounding,
)
from .perturbation import RoadCurves, forward_kept_tokens, linear_impute, noisy_linear_impute, road, token_curves
from .sanity import Randomization, SanityReport, randomization, randomization_layers, sanity_check

__all__ = ["pointing_game", "energy_pointing", "mask_iou", "mask_auc", "word_grounding",
           "deletion_insertion", "Curves", "curve_auc", "patch_order", "step_counts", "step_masks",
           "substrate", "gaussian_blur", "patch_counts", "normalize_maps", "random_maps",
           "centre_prior", "spearman", "ssim", "topk_overlap", "average_ranks", "randomization",
           "Randomization", "randomization_layers", "token_curves", "forward_kept_tokens", "road",
           "RoadCurves", "linear_impute", "noisy_linear_impute", "sanity_check", "SanityReport", "Table"]
