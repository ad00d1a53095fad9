"""Query maps: which attention rows a query stands for, hand-computed values, batching."""

import pytest
import torch

import vitviz
from vitviz import AttentionMaps, LayoutError, TokenLayout
from vitviz.analyze.cls import all_layer_maps, cls_maps
from vitviz.analyze.query import query_maps, query_weights

DEIT = TokenLayout(num_prefix=2, grid=(2, 3))  # CLS, distillation token, 2x3 patches
PLAIN = TokenLayout(num_prefix=0, grid=(2, 2))


def test_query_weights_by_name():
    assert query_weights(DEIT, "cls").tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert query_weights(DEIT, "auto").tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert query_weights(DEIT, "dist").tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert query_weights(DEIT, "cls+dist").tolist() == [0.5, 0.5, 0, 0, 0, 0, 0, 0]
    assert query_weights(DEIT, "prefix").tolist() == [0.5, 0.5, 0, 0, 0, 0, 0, 0]
    assert query_weights(DEIT, "patches").tolist() == pytest.approx([0, 0] + [1 / 6] * 6)
    assert query_weights(PLAIN, "auto").tolist() == [0.25] * 4  # no CLS: mean of the patch rows


def test_query_weights_patch_token_and_tensor():
    # (row, col) = (1, 2) in a 2x3 grid after 2 prefix tokens -> token 2 + 1*3 + 2 = 7
    assert query_weights(DEIT, (1, 2)).argmax().item() == 7
    assert query_weights(DEIT, (-1, -1)).argmax().item() == 7
    assert query_weights(DEIT, (0, 0)).argmax().item() == 2
    assert query_weights(DEIT, 4).argmax().item() == 4
    assert query_weights(DEIT, -1).argmax().item() == 7
    w = query_weights(DEIT, torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 2.0]))
    assert w.tolist() == [0.5, 0, 0, 0, 0, 0, 0, 0.5]


@pytest.mark.parametrize("query,err", [
    ((2, 0), LayoutError), ((0, 3), LayoutError), (8, LayoutError), ("median", ValueError),
    ((1, 2, 3), ValueError), (torch.zeros(8), ValueError), (torch.ones(5), ValueError), (True, ValueError),
])
def test_query_weights_errors(query, err):
    with pytest.raises(err):
        query_weights(DEIT, query)


def test_prefix_queries_need_the_tokens():
    with pytest.raises(LayoutError, match="no CLS"):
        query_weights(PLAIN, "cls")
    with pytest.raises(LayoutError, match="distillation"):
        query_weights(TokenLayout(num_prefix=1, grid=(2, 2)), "dist")
    with pytest.raises(LayoutError, match="prefix"):
        query_weights(PLAIN, "prefix")


def _one_layer(rows):
    """[N][N] rows of one head -> AttentionMaps [1, 1, 1, N, N] on DEIT."""
    return AttentionMaps(torch.tensor(rows, dtype=torch.float32)[None, None, None], DEIT)


def test_query_maps_golden():
    n = DEIT.num_tokens
    rows = [[0.0] * n for _ in range(n)]
    rows[0] = [0.1, 0.1, 0.1, 0.2, 0.1, 0.1, 0.2, 0.1]  # CLS
    rows[1] = [0.3, 0.1, 0.0, 0.0, 0.2, 0.2, 0.1, 0.1]  # distillation token
    rows[7] = [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5]  # patch (1, 2) looks at patch (0, 0) and itself
    for i in range(2, 7):
        rows[i][i] = 1.0
    m = _one_layer(rows)
    assert query_maps(m, (1, 2))[0, 0].tolist() == [[0.5, 0, 0], [0, 0, 0.5]]
    assert torch.allclose(query_maps(m, "cls")[0, 0], torch.tensor([[0.1, 0.2, 0.1], [0.1, 0.2, 0.1]]))
    assert torch.allclose(query_maps(m, "dist")[0, 0], torch.tensor([[0.0, 0.0, 0.2], [0.2, 0.1, 0.1]]))
    assert torch.allclose(query_maps(m, "cls+dist")[0, 0],
                          torch.tensor([[0.05, 0.1, 0.15], [0.15, 0.15, 0.1]]))
    # patches: mean of the six patch rows over the patch keys; rows 2..6 are one-hot on
    # themselves, row 7 splits 0.5 / 0.5 between key 2 and itself
    expect = torch.tensor([[1.5, 1.0, 1.0], [1.0, 1.0, 0.5]]) / 6
    assert torch.allclose(query_maps(m, "patches")[0, 0], expect)
    assert torch.allclose(cls_maps(m, query="dist"), query_maps(m, "dist"))


def test_head_fusion_and_layers():
    g = torch.Generator().manual_seed(1)
    att = torch.softmax(torch.randn(3, 2, 4, 8, 8, generator=g), -1)  # [L, B, H, N, N]
    m = AttentionMaps(att, DEIT)
    per_head = query_maps(m, (0, 1), layer=1)  # [B, H, gh, gw]
    assert per_head.shape == (2, 4, 2, 3)
    assert torch.allclose(per_head[:, 2].flatten(1), att[1, :, 2, 3, 2:])  # token 2 + 0*3 + 1 = 3
    assert torch.allclose(query_maps(m, (0, 1), layer=1, head_fusion="max"), per_head.amax(1))
    assert torch.allclose(query_maps(m, (0, 1), layer=1, head_fusion="mean"), per_head.mean(1))
    assert torch.allclose(query_maps(m, (0, 1), layer=-2), per_head)
    with pytest.raises(ValueError, match="out of range"):
        query_maps(m, "cls", layer=3)
    with pytest.raises(ValueError, match="head_fusion"):
        query_maps(m, "cls", head_fusion="median")


def test_cls_maps_keeps_its_contract_and_all_layers_stack():
    g = torch.Generator().manual_seed(2)
    att = torch.softmax(torch.randn(4, 3, 2, 8, 8, generator=g), -1)
    m = AttentionMaps(att, DEIT)
    assert torch.allclose(vitviz.cls_maps(m), att[-1, :, :, 0, 2:].reshape(3, 2, 2, 3))
    stacked = torch.stack([cls_maps(m, layer=i) for i in range(4)])
    assert torch.allclose(all_layer_maps(m), stacked)
    assert torch.allclose(all_layer_maps(m, query="patches"),
                          torch.stack([query_maps(m, "patches", layer=i) for i in range(4)]))


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    att = torch.softmax(torch.randn(2, 5, 3, 8, 8, generator=g) * 2, -1)
    m = AttentionMaps(att, DEIT)
    for query in ["cls", "dist", "cls+dist", "patches", (1, 0), 5]:
        batched = query_maps(m, query, layer=0)
        for b in range(5):
            single = query_maps(AttentionMaps(att[:, b:b + 1], DEIT), query, layer=0)
            assert torch.allclose(batched[b:b + 1], single)


def test_half_precision_and_device_of_inputs():
    att = torch.softmax(torch.randn(1, 1, 2, 8, 8), -1)
    full = query_maps(AttentionMaps(att, DEIT), "cls")
    half = query_maps(AttentionMaps(att.to(torch.bfloat16), DEIT), "cls")
    assert half.dtype == torch.float32
    assert torch.allclose(full, half, atol=1e-2)
