"""``kvslim::select_pair`` / ``kvslim::merge_rows``: Triton (interpreter on CPU) = reference.

A KVSlimmer merge is ``run_merge.merge_runs``' weights on runs of two applied by ``merge_rows``:
together they must give ``merge_runs``' own merge, the one definition of the arithmetic, whose
properties ``test_run_merge.py`` checks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvslim_fx.kernels import pair_merge_triton
from kvslim_fx.kernels.pair_merge import (
    merge_rows_reference,
    pair_costs,
    select_pair_reference,
)
from kvslim_fx.kernels.pair_merge_triton import merge_rows_triton, select_pair_triton
from kvslim_fx.kernels.run_merge import merge_runs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and type(pair_merge_triton._merge_rows).__name__ != "InterpretedFunction",
    reason="no CUDA and kvslim_fx.kernels was imported before TRITON_INTERPRET=1 was set",
)


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


def _pairs(B: int, H: int, C: int, P: int, seed: int) -> tuple:
    """``P`` disjoint pairs per row and head (consecutive slots of a random permutation)."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.stack([torch.randperm(C, generator=g)[: 2 * P] for _ in range(B * H)])
    slots = slots.view(B, H, P, 2).to(DEVICE)
    return slots[..., 0], slots[..., 1]


def _rope(D: int, kind: str) -> tuple:
    rotary = {"none": 0, "full": D, "partial": D // 2 if D // 2 % 2 == 0 else D}[kind]
    inv_freq = None if rotary == 0 else 10000 ** -(torch.arange(rotary // 2) * 2 / rotary)
    return (None if inv_freq is None else inv_freq.float().to(DEVICE)), rotary


# Pairs of rows to merge: batch, heads, slots, pairs, head dim, RoPE, seed.
PAIRS = dict(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    C=st.integers(2, 24),
    P=st.integers(1, 4),
    D=st.sampled_from([4, 8, 12]),
    rope=st.sampled_from(["none", "full", "partial"]),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=30, deadline=None)
@given(**PAIRS, convex=st.booleans())
def test_merge_rows_with_run_weights_is_merge_runs(B, H, C, P, D, rope, convex, seed):
    """The plan's split (weights from ``merge_runs`` on runs of two, rows combined by
    ``merge_rows``) gives ``merge_runs``' own merged keys and values."""
    P = min(P, C // 2)
    cache = _cache(B, H, C, D, seed, shared=False)
    first, second = _pairs(B, H, C, P, seed + 1)
    inv_freq, rotary = _rope(D, rope)
    members = torch.stack([first, second], dim=-1).flatten(-2)

    def at(x: torch.Tensor) -> torch.Tensor:  # the pairs' members: f0 s0 f1 s1 ...
        return x.gather(2, members if x.dim() == 3 else members[..., None].expand(-1, -1, -1, D))

    pos = at(cache["pos"]).clamp_min(0)
    earlier, later = pos[..., 0::2], pos[..., 1::2]
    pos = torch.stack([earlier.minimum(later), earlier.maximum(later)], -1).flatten(-2)
    coupling = torch.rand(B, H, 2 * P - 1, device=DEVICE)
    within = (torch.arange(2 * P - 1, device=DEVICE) % 2 == 0).expand(B, H, -1)
    merged = merge_runs(
        at(cache["k"]), at(cache["v"]), at(cache["logc"]), at(cache["hess"]), at(cache["score"]),
        pos, coupling, within, inv_freq, rotary, convex, 1e-6,
    )  # fmt: skip
    rows = merge_rows_reference(
        cache["k"], cache["v"], first, second, merged.weight[..., 0::2],
        merged.weight[..., 1::2], merged.share[..., 0::2], merged.share[..., 1::2],
        pos[..., 1::2] - pos[..., 0::2], inv_freq, rotary,
    )  # fmt: skip
    for got, want in zip(rows, (merged.k, merged.v), strict=True):
        torch.testing.assert_close(got, want[..., 1::2, :], atol=1e-4, rtol=1e-4)


@needs_triton
@settings(max_examples=30, deadline=None)
@given(**PAIRS, keys=st.booleans())
def test_merge_rows_triton_matches_reference(B, H, C, P, D, rope, keys, seed):
    P = min(P, C // 2)
    cache = _cache(B, H, C, D, seed, shared=False)
    first, second = _pairs(B, H, C, P, seed + 1)
    inv_freq, rotary = _rope(D, rope)
    g = torch.Generator().manual_seed(seed + 2)
    weights = [torch.randn(B, H, P, generator=g).to(DEVICE) for _ in range(4)]
    key = weights[:2] if keys else [None, None]
    gap = torch.randint(0, 50, (B, H, P), generator=g).to(DEVICE)
    args = (cache["k"], cache["v"], first, second, *key, *weights[2:], gap, inv_freq, rotary)
    want = merge_rows_reference(*args)
    got = merge_rows_triton(*args)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_head", [False, True])
def test_opcheck(per_head):
    cache = _cache(2, 2, 10, 8, seed=3, shared=not per_head)
    C = 10
    sel = (cache["pos"][..., :C], cache["score"][..., :C], 1, 2, per_head, 5.0)
    torch.library.opcheck(torch.ops.kvslim.select_pair.default, sel)
    first, second, _ = (x[..., None] for x in torch.ops.kvslim.select_pair(*sel))
    w = torch.full((2, 2, 1), 0.5, device=DEVICE)
    gap = (second - first).abs()
    inv_freq = 10000 ** -(torch.arange(4, device=DEVICE) / 4)
    merge = (cache["k"], cache["v"], first, second, w, w, w, w, gap, inv_freq, 8)
    torch.library.opcheck(torch.ops.kvslim.merge_rows.default, merge)
