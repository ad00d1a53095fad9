"""word_grids, merge_pieces, split_words and the caption strip: hand-computed values and invariants."""

import numpy as np
import pytest
import torch

from vitviz.analyze.cross import merge_pieces, word_grids
from vitviz.errors import LayoutError
from vitviz.explain.captioning import Word, split_words
from vitviz.render._caption_strip import caption_strip
from vitviz.types import AttentionMaps, CrossAttentionMaps, TokenLayout

# ---------------------------------------------------------------------------------------------
# word_grids: one CLS-like prefix token, then a 2x3 (non-square) patch grid
# ---------------------------------------------------------------------------------------------

LAYOUT = TokenLayout(num_prefix=1, grid=(2, 3))


def golden_cross() -> CrossAttentionMaps:
    t = torch.full((2, 1, 2, 2, 7), 1 / 7)  # [L, B, H, T, Ni]; layer 0 uniform
    t[1, 0, 0] = torch.tensor([[0.4, 0.6, 0, 0, 0, 0, 0],
                               [0, 0, 0, 0, 0, 0, 1.0]])  # head 0
    t[1, 0, 1] = torch.tensor([[0.2, 0, 0, 0, 0, 0.8, 0],
                               [0, 0.2, 0, 0.4, 0.4, 0, 0]])  # head 1
    return CrossAttentionMaps(t, LAYOUT, ["piz", "za"])


def test_word_grids_hand_computed_mean_and_max():
    cross = golden_cross()
    mean = word_grids(cross)  # last layer, heads averaged, prefix dropped, row-major 2x3
    expect = torch.tensor([[[0.3, 0, 0], [0, 0.4, 0]],
                           [[0.1, 0, 0.2], [0.2, 0, 0.5]]])
    torch.testing.assert_close(mean, expect)
    mx = word_grids(cross, head_fusion="max")
    torch.testing.assert_close(mx, torch.tensor([[[0.6, 0, 0], [0, 0.8, 0]],
                                                 [[0.2, 0, 0.4], [0.4, 0, 1.0]]]))
    torch.testing.assert_close(word_grids(cross, layer=0), torch.full((2, 2, 3), 1 / 7))
    torch.testing.assert_close(word_grids(cross, layer=-1), word_grids(cross, layer=1))
    # all layers, all heads
    every = word_grids(cross, layer=None, head_fusion=None)
    assert every.shape == (2, 2, 2, 2, 3)  # [L, H, T, gh, gw]
    torch.testing.assert_close(every[1].mean(0), mean)
    assert word_grids(cross, layer=None).shape == (2, 2, 2, 3)  # [L, T, gh, gw]


def test_merge_pieces_rules_hand_computed():
    cross = golden_cross()
    spans = [(0, 2)]  # "pizza" = "piz" + "za"
    torch.testing.assert_close(word_grids(cross, merge="mean", spans=spans),
                               torch.tensor([[[0.2, 0, 0.1], [0.1, 0.2, 0.25]]]))
    torch.testing.assert_close(word_grids(cross, merge="sum", spans=spans),
                               torch.tensor([[[0.4, 0, 0.2], [0.2, 0.4, 0.5]]]))
    torch.testing.assert_close(word_grids(cross, merge="max", spans=spans),
                               torch.tensor([[[0.3, 0, 0.2], [0.2, 0.4, 0.5]]]))
    # one word per token: merging changes nothing
    torch.testing.assert_close(word_grids(cross, merge="mean", spans=[Word("piz", 0, 1), Word("za", 1, 2)]),
                               word_grids(cross))
    # merging keeps leading axes (layers, heads)
    assert word_grids(cross, layer=None, head_fusion=None, merge="mean", spans=spans).shape == (2, 2, 1, 2, 3)
    # mean over a word's pieces keeps rows that were distributions distributions (prefix included)
    full = merge_pieces(cross.tensor[1, 0].mean(0).reshape(2, 7, 1, 1), spans, "mean", dim=0)
    torch.testing.assert_close(full.sum(), torch.tensor(1.0))


def test_merge_and_layer_errors():
    cross = golden_cross()
    with pytest.raises(LayoutError, match="span"):
        word_grids(cross, merge="mean", spans=[(1, 1)])
    with pytest.raises(LayoutError, match="span"):
        word_grids(cross, merge="mean", spans=[(0, 3)])
    with pytest.raises(LayoutError, match="spans"):
        word_grids(cross, merge="mean")  # a bare CrossAttentionMaps has no words
    with pytest.raises(ValueError, match="merge rule"):
        word_grids(cross, merge="median", spans=[(0, 2)])
    with pytest.raises(LayoutError, match="out of range"):
        word_grids(cross, layer=2)
    with pytest.raises(ValueError, match="head_fusion"):
        word_grids(cross, head_fusion="median")
    assert merge_pieces(torch.zeros(3, 2, 2), []).shape == (0, 2, 2)


def test_rollout_composition_hand_computed():
    layout = TokenLayout(num_prefix=1, grid=(1, 2))
    enc = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 1.0]])  # one layer, one head
    # rollout: 0.5*A + 0.5*I, rows re-normalised: R = [[1,0,0],[0.25,0.75,0],[0,0,1]]
    encoder = AttentionMaps(enc.reshape(1, 1, 1, 3, 3), layout)
    cross = CrossAttentionMaps(torch.tensor([0.2, 0.4, 0.4]).reshape(1, 1, 1, 1, 3), layout)
    # C @ R = [0.2 + 0.4*0.25, 0.4*0.75, 0.4] = [0.3, 0.3, 0.4]; patches [[0.3, 0.4]]
    torch.testing.assert_close(word_grids(cross, rollout=encoder), torch.tensor([[[0.3, 0.4]]]))
    torch.testing.assert_close(word_grids(cross), torch.tensor([[[0.4, 0.4]]]))
    r = torch.tensor([[[1.0, 0, 0], [0.25, 0.75, 0], [0, 0, 1.0]]])  # a [B, N, N] matrix works too
    torch.testing.assert_close(word_grids(cross, rollout=r), torch.tensor([[[0.3, 0.4]]]))
    with pytest.raises(LayoutError, match="encoder"):
        word_grids(cross, rollout=True)  # a bare CrossAttentionMaps carries no encoder attention
    with pytest.raises(LayoutError, match="N = 3"):
        word_grids(cross, rollout=torch.eye(4))


def test_rollout_composition_keeps_rows_distributions():
    torch.manual_seed(0)
    layout = TokenLayout(num_prefix=0, grid=(2, 3))
    enc = AttentionMaps(torch.randn(3, 1, 2, 6, 6).softmax(-1), layout)
    cross = CrossAttentionMaps(torch.randn(2, 1, 2, 4, 6).softmax(-1), layout)
    for fusion in ("mean", "max"):
        g = word_grids(cross, rollout=enc, head_fusion=fusion)  # [T, 2, 3]
        plain = word_grids(cross, head_fusion=fusion)
        torch.testing.assert_close(g.sum((-1, -2)), plain.sum((-1, -2)))  # rows of R sum to 1


# ---------------------------------------------------------------------------------------------
# words
# ---------------------------------------------------------------------------------------------

def test_split_words_wordpiece_hand_checked():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "run", "##ning", ".", "on",
             "the", "grass", ","]
    tok = BertTokenizer(vocab={v: i for i, v in enumerate(vocab)})
    ids = [5, 6, 7, 8, 10, 11, 12, 9]  # a dog run ##ning on the grass .
    pieces, words = split_words(ids, tok)
    assert pieces == ["a", "dog", "run", "##ning", "on", "the", "grass", "."]
    assert words == [Word("a", 0, 1), Word("dog", 1, 2), Word("running", 2, 4), Word("on", 4, 5),
                     Word("the", 5, 6), Word("grass", 6, 7), Word(".", 7, 8)]
    _, words = split_words([5, 6, 13, 5, 6], tok)  # "a dog, a dog": the comma stands alone
    assert [w.text for w in words] == ["a", "dog", ",", "a", "dog"]


def byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["a girl holding a slice of bread", "a dog on the grass"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def test_split_words_byte_level_bpe_merges_pieces():
    tok = byte_level_bpe()
    ids = tok.encode(" a girl holding a slice of pizza. 🍕")
    pieces, words = split_words(ids, tok)
    assert pieces == tok.convert_ids_to_tokens(ids)
    assert [w.text for w in words] == ["a", "girl", "holding", "a", "slice", "of", "pizza", ".", "🍕"]
    pizza = words[6]
    assert len(pizza) > 1  # "pizza" is not in the training text: several pieces, one word
    # the space piece "Ġ" and the emoji's four byte pieces (no single one decodes) are one word
    assert pieces[-5] == "Ġ" and len(words[-1]) == 5
    assert words[0].start == 0 and words[-1].stop == len(ids)


def test_split_words_without_tokenizer_shows_ids():
    pieces, words = split_words([7, 3, 7])
    assert pieces == ["7", "3", "7"] and [(w.text, w.start, w.stop) for w in words] == [
        ("7", 0, 1), ("3", 1, 2), ("7", 2, 3)]


# ---------------------------------------------------------------------------------------------
# the strip
# ---------------------------------------------------------------------------------------------

def test_caption_strip_panels_titles_and_axes():
    import matplotlib.pyplot as plt

    img = np.zeros((24, 36, 3), np.uint8)
    grids = torch.rand(3, 2, 3)  # [W, gh, gw]
    before = plt.get_fignums()
    fig, axes = caption_strip(img, grids, ["a", "dog", "."], title="a dog.")
    assert plt.get_fignums() == before  # drawn without pyplot
    assert len(axes) == 4 and [a.get_title() for a in axes] == ["", "a", "dog", "."]
    assert fig._suptitle.get_text() == "a dog."
    shown = axes[1].get_images()[0].get_array()
    assert shown.shape == (24 * 7, 36 * 7, 3)  # enlarged 7x: the smallest whole factor reaching 2.5 in at 100 dpi

    # wraps into rows; extra axes hidden
    fig, axes = caption_strip(img, torch.rand(6, 2, 3), list("abcdef"), max_cols=4)
    assert len(axes) == 7 and len(fig.axes) == 8 and not fig.axes[-1].get_visible()

    # draws into given axes
    fig2, given = plt.subplots(1, 3)
    try:
        f, used = caption_strip(img, grids[:2], ["a", "b"], axes=given)
        assert f is fig2 and list(used) == list(given)
        with pytest.raises(ValueError, match="axes"):
            caption_strip(img, grids, ["a", "b", "c"], axes=given)
    finally:
        plt.close(fig2)
    with pytest.raises(ValueError, match="words"):
        caption_strip(img, grids, ["a"])
    fig, axes = caption_strip(img, torch.zeros(0, 2, 3), [])  # an empty caption: just the image
    assert [a.get_title() for a in axes] == ["(no words)"]


# ---------------------------------------------------------------------------------------------
# Chefer et al. 2021 encoder-decoder relevance, hand-computed
# ---------------------------------------------------------------------------------------------

def test_encoder_decoder_relevance_hand_computed():
    from vitviz.analyze.cross import encoder_decoder_relevance

    enc = torch.tensor([[0.5, 0.5], [0.0, 1.0]]).reshape(1, 1, 1, 2, 2)  # [Le, B, H, Ni, Ni]
    text = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).reshape(1, 1, 1, 2, 2)  # causal [L, B, H, T, T]
    cross = torch.tensor([[1.0, 0.0], [0.25, 0.75]]).reshape(1, 1, 1, 2, 2)  # [L, B, H, T, Ni]
    ones = torch.ones(1, 1, 1, 2, 2)
    # gradients 1: Ā = A. R_ii = I + A_e = [[1.5, .5], [0, 2]]; R̄_ii = R_ii (rows of R - I sum to 1)
    # R_tt = I + A_t = [[2, 0], [.5, 1.5]] = R̄_tt; R_ti after the self rule = 0
    # R_ti = R̄_ttᵀ A_c R̄_ii = [[2, .5], [0, 1.5]] @ [[1.5, .5], [.375, 1.625]]
    expect = torch.tensor([[[3.1875, 1.8125], [0.5625, 2.4375]]])  # [B, T, Ni]
    got = encoder_decoder_relevance(cross, ones, text, ones, enc, ones)
    torch.testing.assert_close(got, expect)
    # encoder gradients 2: Ā_e = 2 A_e, R_ii - I rows sum to 2, row-normalised: the same R̄_ii
    torch.testing.assert_close(encoder_decoder_relevance(cross, ones, text, ones, enc, 2 * ones), expect)
    # no encoder attention (a CNN): R̄_ii = I  ->  R̄_ttᵀ A_c
    torch.testing.assert_close(encoder_decoder_relevance(cross, ones, text, ones),
                               torch.tensor([[[2.125, 0.375], [0.375, 1.125]]]))
    # negative gradients are clamped away: no relevance at all
    assert encoder_decoder_relevance(cross, -ones, text, ones, enc, ones).abs().max() == 0
    # heads: the clamped products are averaged
    two = torch.cat([cross, torch.zeros_like(cross)], dim=2)  # [1, 1, 2, T, Ni], head 2 silent
    g2 = torch.ones_like(two)
    torch.testing.assert_close(encoder_decoder_relevance(two, g2, text, ones, enc, ones), expect / 2)
    with pytest.raises(LayoutError, match="gradients"):
        encoder_decoder_relevance(cross, ones[..., :1], text, ones)
