"""Analyzers: pure functions from attention tensors to maps. No models, no files, no plots."""

from .cls import cls_maps
from .cross import encoder_decoder_relevance, merge_pieces, word_grids
from .relevance import (chefer_relevance, grad_rollout, grad_rollout_matrix, relevance_map,
                        relevance_matrix)
from .rollout import RolloutStream, discard_smallest, fuse_heads, rollout, rollout_matrix, token_map

__all__ = ["rollout", "rollout_matrix", "RolloutStream", "cls_maps", "fuse_heads", "discard_smallest",
           "token_map", "chefer_relevance", "grad_rollout", "grad_rollout_matrix", "relevance_map",
           "relevance_matrix", "word_grids", "merge_pieces", "encoder_decoder_relevance"]
