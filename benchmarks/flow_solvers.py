"""A second exact max-flow for attention flow, to compare with the one vitviz ships.

vitviz's exact step (``vitviz.analyze.flow._exact_values``) runs OR-tools' push-relabel on
capacities scaled to 62-bit integers: one solve per sink is exact within ``arcs / 2**61``.
The lighter candidate is SciPy's ``scipy.sparse.csgraph.maximum_flow`` (Dinic's algorithm).
SciPy's capacities are 32-bit integers (an int64 matrix is narrowed without a warning:
2**40 becomes 0), so one solve at the largest safe scale, ``2**30``, is exact only within
``arcs / 2**30`` (about 4e-4 for ViT-B/16 at 224 px, where a typical value is 5e-3).
To return the same precision as vitviz (``tol``, default 1e-9), this solver refines:

    round k: H = min(R, U) (U bounds the max flow left in the residual graph R),
             Q = floor(H * s) with s = (2**30 - 1) / U, solve Q with Dinic,
             add its value / s, R -= flow / s, U = arcs(R) / s

Why it is exact: ``min(R, U)`` keeps the max flow of ``R`` (it is at most ``U``); the floored
graph loses less than ``1/s`` per arc of any cut, so the max flow left after the round is at
most ``arcs / s``; every round's flow is feasible for ``R``, so the sum is a feasible flow of
the original graph. Stop when ``arcs / s <= tol``: three rounds at ViT-B/16 size. Every
capacity and the sum of an arc and its reverse stay below 2**31.

The benchmark (``python -m benchmarks.run --flow``) times both on the sinks that the
certificates leave to the exact step; this module is not part of the package.
"""

from __future__ import annotations

import numpy as np

_SCALE_MAX = float(2 ** 30 - 1)  # an arc and its reverse together stay below 2**31


def _layered_arcs(caps: np.ndarray, source: np.ndarray):
    """Arcs of the layered graph of ``vitviz.analyze.flow`` with the bottom layer folded into a
    super-sink (as there): nodes ``g * N + a`` for ``g = 1..L``, source ``S``, sink ``T``.

    Returns ``(tails, heads, capacities, bottom, S, T, num_nodes)``; the last ``N`` arcs are the
    bottom arcs ``(1, a) -> T`` (capacities to be set per sink, ``bottom`` their indices)."""
    num_layers, n, _ = caps.shape
    node_s, node_t = (num_layers + 1) * n, (num_layers + 1) * n + 1
    tokens = np.arange(n)
    tails, heads, cap = [np.full(n, node_s)], [num_layers * n + tokens], [source.astype(np.float64)]
    for g in range(num_layers - 1, 0, -1):  # block g: layer g + 1 -> layer g
        a, b = np.repeat(tokens, n), np.tile(tokens, n)
        tails.append((g + 1) * n + a), heads.append(g * n + b), cap.append(caps[g][a, b])
    tails.append(n + tokens), heads.append(np.full(n, node_t)), cap.append(np.zeros(n))
    tails, heads, cap = np.concatenate(tails), np.concatenate(heads), np.concatenate(cap)
    bottom = np.arange(cap.size - n, cap.size)
    return tails, heads, cap, bottom, node_s, node_t, node_t + 1


def scipy_max_flow(tails, heads, cap, node_s: int, node_t: int, num_nodes: int, tol: float = 1e-9,
                   stats: dict | None = None) -> float:
    """Max-flow value within ``tol`` below the exact one, with SciPy's Dinic on int32 rounds.

    Args:
        tails, heads: ``[E]`` arc end points; cap: ``[E]`` non-negative float capacities.
        node_s, node_t: source and sink; num_nodes: number of nodes.
        tol: absolute precision of the value.
        stats: if given, ``stats["rounds"]`` receives the number of Dinic solves.
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import maximum_flow

    shape = (num_nodes, num_nodes)
    resid = sp.csr_array((cap, (tails, heads)), shape=shape)  # real residual capacities
    bound = float(resid[[node_s], :].sum())  # the source cut bounds the max flow
    total, rounds = 0.0, 0
    while bound > 0:
        scale = _SCALE_MAX / bound
        q = resid.copy()
        q.data = np.floor(np.minimum(q.data, bound) * scale)
        q = q.astype(np.int32)
        q.eliminate_zeros()
        res = maximum_flow(q, node_s, node_t, method="dinic")
        rounds += 1
        total += res.flow_value / scale
        bound = resid.nnz / scale  # arcs, also those floored to zero, over the scale
        if bound <= tol:
            break
        resid = resid - res.flow.astype(np.float64) / scale  # flow is antisymmetric: adds reverse arcs
        resid.data = np.maximum(resid.data, 0.0)  # float rounding of c - f at c = f
    if stats is not None:
        stats["rounds"] = rounds
    return total


def scipy_exact_values(caps: np.ndarray, source: np.ndarray, sinks, tol: float = 1e-9,
                       stats: dict | None = None) -> np.ndarray:
    """Max-flow values from ``source`` ``[N]`` to the bottom tokens ``sinks`` of one sample's
    layered graph ``caps`` ``[L, N, N]`` (float64), each within ``tol`` below the exact value:
    the same answer as vitviz's exact step, computed with SciPy instead of OR-tools."""
    tails, heads, cap, bottom, node_s, node_t, num_nodes = _layered_arcs(caps, source)
    out = np.zeros(len(sinks))
    for i, j in enumerate(sinks):
        cap[bottom] = caps[0, :, j]
        out[i] = scipy_max_flow(tails, heads, cap, node_s, node_t, num_nodes, tol, stats)
    return out
