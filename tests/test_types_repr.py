"""AttentionMaps and CrossAttentionMaps print as one line a person can read: shape, dtype,
layout and row sums, never the raw tensor."""

import torch

from vitviz import AttentionMaps, CrossAttentionMaps, TokenLayout


def test_attention_maps_repr_is_one_line_with_shape_layout_and_row_sums():
    t = torch.softmax(torch.randn(2, 1, 3, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    text = repr(AttentionMaps(t, TokenLayout(num_prefix=1, grid=(2, 2)), layers=(4, 5)))
    assert "\n" not in text and "tensor(" not in text
    assert text.startswith("AttentionMaps([2, 1, 3, 5, 5] [L, B, H, N, N] float32, layout=TokenLayout(num_prefix=1")
    assert "layers=4-5" in text and text.endswith("rows sum to 1.000-1.000)")
    # rows that do not sum to 1 (windows with padding) say so: the numbers are the tensor's own
    half = AttentionMaps(t * 0.5, TokenLayout(num_prefix=1, grid=(2, 2)))
    assert "rows sum to 0.500-0.500" in repr(half)


def test_reduced_keys_and_cross_attention_repr():
    q, k = TokenLayout(num_prefix=0, grid=(4, 4)), TokenLayout(num_prefix=0, grid=(2, 2))
    t = torch.softmax(torch.randn(1, 1, 2, 16, 4), -1)
    assert "key_layout=TokenLayout(num_prefix=0, grid=(2, 2)" in repr(AttentionMaps(t, q, k))
    c = torch.softmax(torch.randn(1, 1, 2, 7, 5), -1) * 0.25  # a VLM's rows: the rest went to text tokens
    text = repr(CrossAttentionMaps(c.double(), TokenLayout(num_prefix=1, grid=(2, 2)), tokens=list("abcdefg")))
    assert text.startswith("CrossAttentionMaps([1, 1, 2, 7, 5] [L, B, H, T, Ni] float64")
    assert "tokens=['a', 'b', 'c', 'd', 'e', ...]" in text and "rows sum to 0.250-0.250" in text
    assert "\n" not in text and "tensor(" not in text
