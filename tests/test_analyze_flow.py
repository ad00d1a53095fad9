"""Attention flow: equal to a textbook max-flow (Edmonds-Karp, and networkx) on small graphs,
hand-computed golden values, the paper's definition, batching, and the ViT-B/16 size."""

from collections import deque

import numpy as np
import pytest
import torch

from vitviz import AttentionMaps, TokenLayout
from vitviz.analyze._rollout import rollout_matrix
from vitviz.analyze.flow import attention_flow, flow_matrices, flow_values, layered_max_flow


@pytest.fixture(autouse=True)
def no_memo(monkeypatch):
    """Every test here computes its values (the memo would answer a second call with the first's
    values, and batched-vs-one-by-one would compare a result with itself); test_memo_* turn it on."""
    import vitviz.analyze.flow as flow

    monkeypatch.setattr(flow, "_MEMO_SAMPLES", 0)
    flow._memo.clear()
    yield
    flow._memo.clear()


# -- a textbook max-flow, written out for the tests ------------------------------------------------

def edmonds_karp(arcs, s, t):
    """Max-flow value by shortest augmenting paths (Edmonds & Karp 1972). arcs: {(u, v): cap}."""
    res = {}
    for (u, v), c in arcs.items():
        res.setdefault(u, {}).setdefault(v, 0.0)
        res.setdefault(v, {}).setdefault(u, 0.0)
        res[u][v] += c
    total = 0.0
    while True:
        parent = {s: None}
        queue = deque([s])
        while queue and t not in parent:
            u = queue.popleft()
            for v, c in res.get(u, {}).items():
                if c > 1e-15 and v not in parent:
                    parent[v] = u
                    queue.append(v)
        if t not in parent:
            return total
        path, v = [], t
        while parent[v] is not None:
            path.append((parent[v], v))
            v = parent[v]
        push = min(res[u][v] for u, v in path)
        for u, v in path:
            res[u][v] -= push
            res[v][u] += push
        total += push


def layered_arcs(caps, source):
    """The layered graph of layered_max_flow as an arc dict. caps [L, N, N], source [N]."""
    num_layers, n, _ = caps.shape
    arcs = {("s", (num_layers, i)): float(source[i]) for i in range(n) if source[i] > 0}
    for g in range(num_layers):
        for a in range(n):
            for b in range(n):
                if caps[g, a, b] > 0:
                    arcs[((g + 1, a), (g, b))] = float(caps[g, a, b])
    return arcs


def textbook(caps, source):
    arcs = layered_arcs(caps, source)
    return np.array([edmonds_karp(arcs, "s", (0, j)) for j in range(caps.shape[-1])])


def random_graph(rng, b, num_layers, n, density):
    caps = rng.random((b, num_layers, n, n)) * (rng.random((b, num_layers, n, n)) < density)
    source = rng.random((b, n)) * (rng.random((b, n)) < 0.7)
    return torch.from_numpy(caps), torch.from_numpy(source)


# -- the engine against the textbook ---------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_equals_edmonds_karp_on_random_layered_graphs(seed):
    rng = np.random.default_rng(seed)
    num_layers, n = int(rng.integers(1, 5)), int(rng.integers(2, 7))
    caps, source = random_graph(rng, 2, num_layers, n, density=rng.uniform(0.3, 1.0))
    fast = layered_max_flow(caps, source)
    exact = layered_max_flow(caps, source, exact_only=True)
    for b in range(2):
        ref = textbook(caps[b].numpy(), source[b].numpy())
        assert np.allclose(fast[b].numpy(), ref, atol=1e-9), (fast[b], ref)
        assert np.allclose(exact[b].numpy(), ref, atol=1e-9), (exact[b], ref)


def test_equals_networkx_on_attention_like_graphs():
    import networkx as nx  # installed with torch
    rng = np.random.default_rng(7)
    for _ in range(3):
        num_layers, n = 4, 6
        logits = torch.from_numpy(rng.normal(size=(num_layers, 1, 2, n, n)) * 3)
        attn = AttentionMaps(torch.softmax(logits, -1), TokenLayout(num_prefix=1, grid=(1, 5)))
        caps = flow_matrices(attn)[0].numpy()  # [L, N, N]
        graph = nx.DiGraph()
        for (u, v), c in layered_arcs(caps, np.eye(n)[0]).items():
            graph.add_edge(u, v, capacity=c)
        ref = [nx.maximum_flow_value(graph, "s", (0, j)) for j in range(n)]
        assert np.allclose(flow_values(attn)[0].numpy(), ref, atol=1e-9)


def test_single_layer_closed_form():
    # one block: the flow to j is sum_i min(w_i, caps[i, j])
    caps = torch.tensor([[[0.2, 0.8], [0.6, 0.1]]], dtype=torch.float64)[None]  # [1, 1, 2, 2]
    source = torch.tensor([[0.5, 0.3]], dtype=torch.float64)
    out = layered_max_flow(caps, source)
    assert out[0].tolist() == pytest.approx([0.2 + 0.3, 0.5 + 0.1])


def test_two_layers_single_source_closed_form():
    # source node c: the flow to j is sum_a min(caps_1[c, a], caps_0[a, j])
    rng = np.random.default_rng(3)
    caps = torch.from_numpy(rng.random((1, 2, 5, 5)))
    source = torch.zeros(1, 5, dtype=torch.float64)
    source[0, 2] = 10.0
    out = layered_max_flow(caps, source)[0]
    expect = torch.minimum(caps[0, 1, 2][:, None], caps[0, 0]).sum(0)
    assert torch.allclose(out, expect, atol=1e-12)


def test_input_checks():
    caps = torch.rand(1, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-negative"):
        layered_max_flow(-caps, torch.ones(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="source"):
        layered_max_flow(caps, torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B, L, N, N\]"):
        layered_max_flow(caps[0], torch.ones(1, 3, dtype=torch.float64))


# -- attention flow ------------------------------------------------------------------------------

ONE_CLS_TWO_PATCHES = TokenLayout(num_prefix=1, grid=(1, 2))


def test_attention_flow_golden_differs_from_rollout():
    # block 0: A0 = [[1,0,0],[0,0,1],[0,1,0]] -> Â0 = [[1,0,0],[0,.5,.5],[0,.5,.5]]
    # block 1: CLS row [0,1,0] -> Â1[0] = [.5,.5,0]
    # flow to j = sum_a min(Â1[0,a], Â0[a,j]) = [.5, .5, .5] -> normalised [1/3, 1/3, 1/3]
    # rollout: (Â1 Â0)[0] = [.5, .25, .25]
    a0 = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    a1 = [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    attn = AttentionMaps(torch.tensor([[[a0]], [[a1]]]), ONE_CLS_TWO_PATCHES)  # [2, 1, 1, 3, 3]
    assert flow_values(attn)[0].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert attention_flow(attn)[0, 0].tolist() == pytest.approx([1 / 3, 1 / 3])
    assert attention_flow(attn, normalize=False)[0, 0].tolist() == pytest.approx([0.5, 0.5])
    assert rollout_matrix(attn)[0, 0].tolist() == pytest.approx([0.5, 0.25, 0.25])
    # from the last block only: the flow is Â1's CLS row
    assert flow_values(attn, start_layer=1)[0].tolist() == pytest.approx([0.5, 0.5, 0.0])


def paper_reference(att, query_w):
    """Abnar & Zuidema's recipe, written from their code: mean over heads, + I, row-normalise,
    arcs layer i -> i-1, max-flow from the output node(s) to every input node, normalise.
    att: [L, H, N, N] one sample; query_w: [N] weights of a super-source (one-hot = one token)."""
    res = att.mean(1) + np.eye(att.shape[-1])[None]
    res = res / res.sum(-1, keepdims=True)
    raw = textbook(res, query_w)
    return raw, raw / raw.sum()


@pytest.mark.parametrize("query,layout", [
    ("cls", TokenLayout(num_prefix=1, grid=(2, 2))),
    ("dist", TokenLayout(num_prefix=2, grid=(2, 2))),
    ("cls+dist", TokenLayout(num_prefix=2, grid=(2, 2))),
    ("patches", TokenLayout(num_prefix=1, grid=(2, 2))),
    ("auto", TokenLayout(num_prefix=0, grid=(2, 3))),
    ((1, 0), TokenLayout(num_prefix=1, grid=(2, 2))),
])
def test_attention_flow_matches_the_paper_definition(query, layout):
    from vitviz.analyze import query_weights

    g = torch.Generator().manual_seed(11)
    n = layout.num_tokens
    att = torch.softmax(torch.randn(3, 2, 2, n, n, generator=g, dtype=torch.float64) * 3, -1)
    attn = AttentionMaps(att, layout)
    maps = attention_flow(attn, query=query)
    raw = flow_values(attn, query=query)
    w = query_weights(layout, query, dtype=torch.float64).numpy()
    for b in range(2):
        ref_raw, ref_norm = paper_reference(att[:, b].numpy(), w)
        assert np.allclose(raw[b].numpy(), ref_raw, atol=1e-9)
        assert np.allclose(maps[b].flatten().numpy(), ref_norm[layout.num_prefix:], atol=1e-6)


def test_flow_lies_between_rollout_and_the_simple_cuts():
    # the rollout walk restricted to the paths that end at j is a feasible flow (R[c, j] <= F_j);
    # the source arcs (total 1) and the sink arcs (column sum of Â_0) are cuts
    g = torch.Generator().manual_seed(5)
    layout = TokenLayout(num_prefix=1, grid=(3, 3))
    att = torch.softmax(torch.randn(4, 3, 2, 10, 10, generator=g) * 2, -1)
    attn = AttentionMaps(att, layout)
    f = flow_values(attn)  # [B, N]
    r = rollout_matrix(attn).double()[:, 0]  # [B, N]
    caps = flow_matrices(attn)
    assert (f >= r - 1e-6).all()
    assert (f <= torch.minimum(torch.ones_like(f), caps[:, 0].sum(1)) + 1e-12).all()


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(9)
    layout = TokenLayout(num_prefix=2, grid=(2, 3))
    att = torch.softmax(torch.randn(3, 4, 2, 8, 8, generator=g) * 3, -1)
    batched = attention_flow(AttentionMaps(att, layout), query="cls+dist", head_fusion="max")
    for b in range(4):
        single = attention_flow(AttentionMaps(att[:, b:b + 1], layout), query="cls+dist", head_fusion="max")
        assert torch.allclose(batched[b:b + 1], single, atol=1e-7)


def test_certificates_agree_with_the_exact_solver_and_are_used():
    g = torch.Generator().manual_seed(4)
    layout = TokenLayout(num_prefix=1, grid=(5, 6))
    # near-uniform attention and 12 blocks: the product coupling of the rollout flow and the
    # pull flow fits under the capacities (with few blocks the 0.5 self-weight keeps both too
    # concentrated, and the exact solver takes over)
    att = torch.softmax(torch.randn(12, 1, 3, 31, 31, generator=g) * 0.5, -1)
    caps = flow_matrices(AttentionMaps(att, layout))
    source = torch.zeros(1, 31, dtype=torch.float64)
    source[:, 0] = 1.0
    stats = {}
    fast = layered_max_flow(caps, source, stats=stats)
    exact = layered_max_flow(caps, source, exact_only=True)
    assert stats["certified"].all()  # the certificates settled every sink
    assert torch.allclose(fast, exact, atol=1e-9)
    shallow = flow_matrices(AttentionMaps(att[:4], layout))
    stats = {}
    fast = layered_max_flow(shallow, source, stats=stats)
    assert not stats["certified"].all()  # the exact solver ran for some sinks
    assert torch.allclose(fast, layered_max_flow(shallow, source, exact_only=True), atol=1e-9)


def peaked_attention(num_layers, heads, n, generator, sinks=(0, 5, 7), mass=0.7):
    """Trained-model-like attention: ``mass`` of every row on a few sink tokens."""
    att = torch.softmax(torch.randn(num_layers, 1, heads, n, n, generator=generator, dtype=torch.float64) * 2, -1)
    att = att * (1 - mass)
    att[..., list(sinks)] += mass / len(sinks)
    return att


def test_peaked_attention_equals_networkx():
    # the case the certificates cannot settle: every sink goes to the exact solver
    import networkx as nx
    g = torch.Generator().manual_seed(11)
    layout = TokenLayout(num_prefix=1, grid=(5, 6))
    attn = AttentionMaps(peaked_attention(6, 4, 31, g), layout)
    caps = flow_matrices(attn)[0].numpy()  # [L, N, N]
    graph = nx.DiGraph()
    for (u, v), c in layered_arcs(caps, np.eye(31)[0]).items():
        graph.add_edge(u, v, capacity=c)
    stats = {}
    values = layered_max_flow(torch.from_numpy(caps)[None], torch.eye(31, dtype=torch.float64)[:1], stats=stats)
    assert not stats["certified"].any()
    for j in (0, 3, 5, 12, 30):
        assert values[0, j].item() == pytest.approx(nx.maximum_flow_value(graph, "s", (0, j)), abs=1e-9)


def test_capacities_too_large_for_tol_are_refused():
    caps = torch.full((1, 2, 3, 3), 1e12, dtype=torch.float64)
    source = torch.tensor([[1e12, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="tol"):
        layered_max_flow(caps, source, exact_only=True)
    scaled = layered_max_flow(caps / 1e12, source / 1e12, exact_only=True)  # the fix it names
    assert torch.allclose(scaled, torch.ones(1, 3, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("peaked", [False, True])
def test_vit_b16_size(peaked):
    # ViT-B/16 at 224 px: 12 layers, 12 heads, 197 tokens. Spread-out (untrained-like)
    # attention is settled by the certificates alone; peaked (trained-like) attention sends
    # every sink to the exact solver. Timings: python -m benchmarks.run --flow
    g = torch.Generator().manual_seed(0)
    if peaked:
        att = peaked_attention(12, 12, 197, g)
    else:
        att = torch.softmax(torch.randn(12, 1, 12, 197, 197, generator=g, dtype=torch.float64), -1)
    caps = flow_matrices(AttentionMaps(att, TokenLayout(num_prefix=1, grid=(14, 14))))
    source = torch.zeros(1, 197, dtype=torch.float64)
    source[0, 0] = 1.0
    stats = {}
    values = layered_max_flow(caps, source, stats=stats)
    assert bool(stats["certified"].all()) != peaked
    # the max flow to j is at most the sink's arcs and at least the rollout flow's share
    roll = rollout_matrix(AttentionMaps(att, TokenLayout(num_prefix=1, grid=(14, 14))))[0, 0].double()
    assert (values[0] >= roll - 1e-6).all()
    assert (values[0] <= caps[0, 0].sum(0) + 1e-12).all() and (values <= 1 + 1e-12).all()


# -- memo and threads ------------------------------------------------------------------------------

def test_memo_answers_the_same_attention_without_solving(monkeypatch):
    """A sample asked again (the cascade's head step: its attention is the trained model's) is
    answered from the memo with the values computed the first time; a changed sample is solved."""
    import vitviz.analyze.flow as flow

    monkeypatch.setattr(flow, "_MEMO_SAMPLES", 4096)
    g = torch.Generator().manual_seed(21)
    layout = TokenLayout(num_prefix=1, grid=(3, 3))
    att = torch.cat([peaked_attention(3, 2, 10, g) for _ in range(3)], dim=1)  # [3, 3, 2, 10, 10]
    solved = []
    solve = flow._solve

    def counting(caps, source, *args):
        solved.append(caps.shape[0])
        return solve(caps, source, *args)

    monkeypatch.setattr(flow, "_solve", counting)
    first = flow_values(AttentionMaps(att, layout))  # [3, 10]
    again = flow_values(AttentionMaps(att, layout))
    assert solved == [3] and torch.equal(first, again)
    changed = att.clone()
    changed[:, 1] = torch.softmax(torch.randn(3, 2, 10, 10, generator=g, dtype=torch.float64), -1)
    mixed = flow_values(AttentionMaps(changed, layout))
    assert solved == [3, 1]  # only sample 1 was solved
    assert torch.equal(mixed[[0, 2]], first[[0, 2]])
    caps = flow_matrices(AttentionMaps(changed[:, 1:2], layout))
    source = torch.zeros(1, 10, dtype=torch.float64)
    source[:, 0] = 1.0
    assert torch.allclose(mixed[1:2], layered_max_flow(caps, source, exact_only=True), atol=1e-9)
    assert not torch.equal(mixed[1], first[1])
    flow_values(AttentionMaps(att, layout), tol=1e-6)  # another tol is another question
    assert solved == [3, 1, 1, 3]  # (the exact_only reference above solved its one sample)
    monkeypatch.setattr(flow, "_MEMO_SAMPLES", 2)
    flow_values(AttentionMaps(att, layout), tol=1e-7)
    assert len(flow._memo) == 2  # bounded: the oldest entries go


def test_threads_give_the_values_of_one_thread():
    """The exact step solves samples in parallel threads; each value is that sample's max flow,
    whatever the thread count (integer capacities: bit for bit)."""
    g = torch.Generator().manual_seed(22)
    att = torch.cat([peaked_attention(3, 2, 12, g) for _ in range(4)], dim=1)  # [3, 4, 2, 12, 12]
    caps = flow_matrices(AttentionMaps(att, TokenLayout(num_prefix=0, grid=(3, 4))))
    source = torch.rand(4, 12, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layered_max_flow(caps, source, exact_only=True)
        torch.set_num_threads(3)
        three = layered_max_flow(caps, source, exact_only=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    want = np.stack([textbook(caps[i].numpy(), source[i].numpy()) for i in range(4)])
    assert np.allclose(three.numpy(), want, atol=1e-9)
