"""Analyzers: pure functions from attention tensors to maps. No models, no files, no plots."""

from .cls import cls_maps
from .rollout import discard_smallest, fuse_heads, rollout, rollout_matrix, token_map

__all__ = ["rollout", "rollout_matrix", "cls_maps", "fuse_heads", "discard_smallest", "token_map"]
