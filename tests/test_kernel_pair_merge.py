"""``kvslim::select_pair`` / ``kvslim::merge_pairs``: Triton (interpreter on CPU) = reference.

The merge reference is ``run_merge.merge_runs`` on runs of two: the one definition of the merge
arithmetic, whose properties ``test_run_merge.py`` checks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvslim_fx.kernels import pair_merge_triton
from kvslim_fx.kernels.pair_merge import (
    merge_pairs_reference,
    pair_costs,
    select_pair_reference,
)
from kvslim_fx.kernels.pair_merge_triton import merge_pairs_triton, select_pair_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and type(pair_merge_triton._merge_pair).__name__ != "InterpretedFunction",
    reason="no CUDA and kvslim_fx.kernels was imported before TRITON_INTERPRET=1 was set",
)
STATE = ("k", "v", "logc", "pos", "hess", "score", "steps")


def _cache(B: int, H: int, C: int, D: int, seed: int, shared: bool) -> dict[str, torch.Tensor]:
    """A random slot cache (trash slot included): distinct positions, ~25 % empty slots."""
    g = torch.Generator().manual_seed(seed)
    heads = 1 if shared else H
    pos = torch.stack([
        torch.stack([torch.randperm(3 * C, generator=g)[:C] for _ in range(heads)])
        for _ in range(B)
    ])  # fmt: skip
    pos[torch.rand(pos.shape, generator=g) < 0.25] = -1
    pos = torch.cat([pos.expand(B, H, C), torch.full((B, H, 1), -1)], dim=2)
    n = C + 1
    cache = {
        "k": torch.randn(B, H, n, D, generator=g),
        "v": torch.randn(B, H, n, D, generator=g),
        "logc": 2 * torch.rand(B, H, n, generator=g),
        "pos": pos,
        "hess": torch.randn(B, H, n, generator=g).abs() * (torch.rand(B, H, n, generator=g) - 0.1),
        "score": torch.rand(B, H, n, generator=g),
        "steps": torch.randint(1, 9, (B, H, n), generator=g).float(),
    }
    return {name: t.to(DEVICE) for name, t in cache.items()}


@needs_triton
@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    C=st.integers(2, 32),
    sink=st.integers(0, 5),
    recent=st.integers(0, 6),
    per_head=st.booleans(),
    gamma=st.sampled_from([0.0, 0.0, 3.0, 656.8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_select_pair_triton_matches_reference(B, H, C, sink, recent, per_head, gamma, seed):
    cache = _cache(B, H, C, 4, seed, shared=not per_head)
    pos, score = cache["pos"][..., :C], cache["score"][..., :C]
    first, second, ok = select_pair_reference(pos, score, sink, recent, per_head, gamma)
    t_first, t_second, t_ok = select_pair_triton(pos, score, sink, recent, per_head, gamma)
    assert torch.equal(t_ok, ok)
    assert torch.equal(t_first[ok], first[ok]) and torch.equal(t_second[ok], second[ok])
    # The chosen pair is adjacent in position order and has the lowest finite edge cost.
    order, _, _, edge = pair_costs(pos, score, sink, recent, per_head, gamma)
    for b, h in ok.nonzero().tolist():
        i = int((order[b, h] == first[b, h]).nonzero())
        assert order[b, h, i + 1] == second[b, h]
        assert edge[b, h, i] == edge[b, h].min()


@needs_triton
@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    C=st.integers(2, 24),
    P=st.integers(1, 4),
    D=st.sampled_from([4, 8, 12]),
    rope=st.sampled_from(["none", "full", "partial"]),
    convex=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_pairs_triton_matches_reference(B, H, C, P, D, rope, convex, seed):
    P = min(P, C // 2)
    cache = _cache(B, H, C, D, seed, shared=False)
    g = torch.Generator().manual_seed(seed + 1)
    alpha = torch.rand(B, H, C, generator=g).to(DEVICE) / C
    out = torch.randn(B, H, D, generator=g).to(DEVICE)
    # P disjoint pairs per row and head: consecutive slots of a random permutation.
    slots = torch.stack([torch.randperm(C, generator=g)[: 2 * P] for _ in range(B * H)])
    slots = slots.view(B, H, P, 2).to(DEVICE)
    first, second = slots[..., 0], slots[..., 1]
    do = torch.rand(B, H, P, generator=g).to(DEVICE) < 0.7
    rotary = {"none": 0, "full": D, "partial": D // 2 if D // 2 % 2 == 0 else D}[rope]
    inv_freq = None if rotary == 0 else 10000 ** -(torch.arange(rotary // 2) * 2 / rotary)
    inv_freq = None if inv_freq is None else inv_freq.float().to(DEVICE)

    want, got = ({n: t.clone() for n, t in cache.items()} for _ in range(2))
    args = (alpha, out, first, second, do, inv_freq, rotary, convex, 1e-6)
    fb_want = merge_pairs_reference(*(want[n] for n in STATE), *args)
    fb_got = merge_pairs_triton(*(got[n] for n in STATE), *args)
    assert torch.equal(fb_got, fb_want)
    # Unclipped weights may extrapolate (A + B small beside A, B), which amplifies float32
    # rounding: keys of magnitude ~10 then differ in the 5th digit.
    for name in STATE:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4, msg=name)
    # Slots of no merged pair are bit-identical; each merged pair conserves cardinality, keeps
    # the later slot's position and empties `first`.
    touched = torch.zeros_like(cache["pos"], dtype=torch.bool)
    for b, h, p in do.nonzero().tolist():
        i, j = int(first[b, h, p]), int(second[b, h, p])
        touched[b, h, [i, j]] = True
        card = cache["logc"][b, h, [i, j]].exp().sum()
        torch.testing.assert_close(want["logc"][b, h, j].exp(), card)
        assert want["pos"][b, h, i] == -1 and want["pos"][b, h, j] == cache["pos"][b, h, j]
    for name in STATE:
        assert torch.equal(want[name][~touched], cache[name][~touched])
    assert fb_want.shape == (B, H, P)


@pytest.mark.parametrize("per_head", [False, True])
def test_opcheck(per_head):
    cache = _cache(2, 2, 10, 8, seed=3, shared=not per_head)
    C = 10
    sel = (cache["pos"][..., :C], cache["score"][..., :C], 1, 2, per_head, 5.0)
    torch.library.opcheck(torch.ops.kvslim.select_pair.default, sel)
    first, second, ok = (x[..., None] for x in torch.ops.kvslim.select_pair(*sel))
    alpha = torch.full((2, 2, C), 0.05, device=DEVICE)
    out = torch.zeros(2, 2, 8, device=DEVICE)
    inv_freq = 10000 ** -(torch.arange(4, device=DEVICE) / 4)
    merge = (*(cache[n] for n in STATE), alpha, out, first, second, ok, inv_freq, 8, True, 1e-6)
    torch.library.opcheck(torch.ops.kvslim.merge_pairs.default, merge)
