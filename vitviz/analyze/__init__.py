"""Analyzers: pure functions from attention tensors to maps. No models, no files, no plots."""

from ._rollout import (
    RolloutStream,
    discard_smallest,
    rollout,
    rollout_matrices,
    rollout_matrix,
    token_map,
)
from ._tokens import HEAD_FUSIONS, QUERY_NAMES, Query, check_layer, check_options, fuse_heads, query_weights
from .cls import all_layer_maps, cls_maps
from .cross import encoder_decoder_relevance, merge_pieces, word_grids
from .flow import attention_flow, flow_values, layered_max_flow
from .gradient import (
    RelevanceStream,
    chefer_relevance,
    grad_rollout,
    grad_rollout_matrix,
    relevance_map,
    relevance_matrix,
)
from .masks import mass_masks
from .posembed import pos_similarity_matrix
from .query import query_maps
from .stats import attention_entropy, mean_attention_distance, prefix_attention_share

__all__ = ["rollout", "rollout_matrix", "rollout_matrices", "RolloutStream", "cls_maps", "fuse_heads",
           "discard_smallest",
           "token_map", "chefer_relevance", "grad_rollout", "grad_rollout_matrix", "relevance_map",
           "relevance_matrix", "RelevanceStream", "word_grids", "merge_pieces", "encoder_decoder_relevance",
           "all_layer_maps",
           "attention_flow", "flow_values", "layered_max_flow", "mass_masks", "pos_similarity_matrix",
           "query_maps", "query_weights", "attention_entropy", "mean_attention_distance",
           "prefix_attention_share", "check_layer", "check_options", "Query", "HEAD_FUSIONS", "QUERY_NAMES"]
