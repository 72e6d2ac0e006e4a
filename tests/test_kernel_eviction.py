"""``kvslim::select_one``: the reference against a per-row Python model of its rule, the Triton
kernel (under ``TRITON_INTERPRET=1`` without a GPU) against the reference, and ``opcheck``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvslim_fx.kernels import eviction_triton
from kvslim_fx.kernels.eviction import select_one_reference
from kvslim_fx.kernels.eviction_triton import select_one_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_INTERPRETED = type(eviction_triton._select_one).__name__ == "InterpretedFunction"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not _INTERPRETED,
    reason="no CUDA and kvslim_fx.kernels was imported before TRITON_INTERPRET=1 was set",
)


def make_case(
    B: int, H: int, C: int, seed: int, *, fold: bool = True, shared: bool = False,
    noncontig: bool = False,
) -> list:  # fmt: skip
    """Random ``select_one`` tensor arguments: mostly full caches of distinct positions below the
    row's next one (a pad for some rows), scores from a few values (ties), zero weights."""
    g = torch.Generator().manual_seed(seed)
    T = C + int(torch.randint(0, 6, (1,), generator=g))  # the new token's position
    pos = torch.full((B, H, C + 1), -1)
    for b in range(B):
        for h in range(H):
            if shared and h:
                pos[b, h] = pos[b, 0]
                continue
            n = (
                C
                if torch.rand(1, generator=g) < 0.7
                else int(torch.randint(0, C + 1, (1,), generator=g))
            )
            slots = torch.randperm(C, generator=g)[:n]
            pos[b, h, slots] = torch.randperm(T, generator=g)[:n]
    kv_pos = torch.where(torch.rand(B, 1, generator=g) < 0.15, -1, T)
    score = torch.tensor([0.0, 0.25, 0.5, 2.0])[torch.randint(0, 4, (B, H, C + 1), generator=g)]
    weight = torch.rand(B, H, C + 1, generator=g) * (torch.rand(B, H, C + 1, generator=g) < 0.7)
    if noncontig:  # heads-last layouts, a slice of a wider position tensor
        pos = pos.transpose(1, 2).contiguous().transpose(1, 2)
        kv_pos = torch.cat([kv_pos, kv_pos], dim=1)[:, :1]
        score = score.transpose(1, 2).contiguous().transpose(1, 2)
    args = [pos, kv_pos, score, weight if fold else None]
    return [a if a is None else a.to(DEVICE) for a in args]


def python_rule(args: list, sink: int, recent: int, window: int, per_head: bool) -> list:
    """The op's documented rule, one ``(row, head)`` at a time with Python lists."""
    cache_pos, kv_pos, score, weight = (a if a is None else a.cpu() for a in args)
    B, H, S = cache_pos.shape
    C = S - 1
    out = {name: [] for name in ("slot", "drop", "right", "w_drop", "w_right", "fallback")}
    for b in range(B):
        for h in range(H):
            new = int(kv_pos[b, 0])
            pos = [*cache_pos[b, h, :C].tolist(), new]
            newest = max(pos)
            if per_head:
                s = score[b, h].tolist()
            else:  # summed in head order, in float32
                total = score[b, 0].clone()
                for hh in range(1, H):
                    total = total + score[b, hh]
                s = total.tolist()
            gone = [bool(window) and newest - p >= window for p in pos]  # left the window
            s = [-float("inf") if out else x for x, out in zip(s, gone, strict=True)]
            eligible = [e for e, p in enumerate(pos) if p >= max(sink, 0) and p <= newest - recent]
            need = sum(p >= 0 for p in pos) > C
            drop = min(eligible, key=lambda e: (s[e], pos[e], e)) if need and eligible else -1
            right, a, c, fallback = -1, 0.0, 0.0, False
            later = [e for e, p in enumerate(pos) if drop >= 0 and p > pos[drop]]
            if weight is not None and later:
                right = min(later, key=lambda e: (pos[e], e))
                w_j, w_r = weight[b, h, drop], weight[b, h, right]
                total = w_j + w_r
                a, c = (w_j / total, w_r / total) if total > 0 else (0.5, 0.5)
                fallback = bool(total <= 0)
            free = [e for e in range(C) if pos[e] < 0]
            slot = drop if drop >= 0 else (free[0] if new >= 0 and free else C)
            for name, x in zip(out, (slot, drop, right, float(a), float(c), fallback), strict=True):
                out[name].append(x)
    dtypes = (torch.long, torch.long, torch.long, torch.float32, torch.float32, torch.bool)
    return [torch.tensor(x, dtype=t).view(B, H) for x, t in zip(out.values(), dtypes, strict=True)]


CASES = dict(
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    C=st.integers(1, 40),
    sink=st.integers(0, 4),
    recent=st.integers(0, 4),
    window=st.sampled_from([0, 0, 3, 8, 20]),
    per_head=st.booleans(),
    fold=st.booleans(),
    shared=st.booleans(),
    noncontig=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(**CASES)
def test_reference_follows_the_rule(B, H, C, sink, recent, window, per_head, fold, shared,
                                    noncontig, seed):  # fmt: skip
    args = make_case(B, H, C, seed, fold=fold, shared=shared, noncontig=noncontig)
    want = python_rule(args, sink, recent, window, per_head)
    got = select_one_reference(*args, sink, recent, window, per_head)
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x.cpu(), y)


@needs_triton
@settings(max_examples=40, deadline=None, derandomize=True)
@given(**CASES)
def test_triton_matches_reference(B, H, C, sink, recent, window, per_head, fold, shared,
                                  noncontig, seed):  # fmt: skip
    args = make_case(B, H, C, seed, fold=fold, shared=shared, noncontig=noncontig)
    want = select_one_reference(*args, sink, recent, window, per_head)
    got = select_one_triton(*args, sink, recent, window, per_head)
    for x, y in zip(got, want, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_one_decode_step_by_hand():
    """Cache of 4 (positions 0, 2, 3, 1 in slots 0-3), new token at 4, sink 1, recent 1: the
    eligible ones are 1, 2, 3; 2 (slot 1) has the lowest score and folds into 3 (slot 2) with
    weights 1 : 3; the new token takes slot 1."""
    cache_pos = torch.tensor([[[0, 2, 3, 1, -1]]])
    score = torch.tensor([[[0.0, 0.1, 0.5, 0.3, 0.0]]])  # slots, then the new token
    weight = torch.tensor([[[0.0, 1.0, 3.0, 0.0, 0.0]]])
    plan = torch.ops.kvslim.select_one(cache_pos, torch.tensor([[4]]), score, weight, 1, 1, 0, True)
    assert [x.item() for x in plan] == [1, 1, 2, 0.25, 0.75, False]


def _opcheck_case(fold: bool, per_head: bool, window: int) -> tuple:
    args = make_case(2, 3, 9, seed=int(fold) + 2 * int(per_head), fold=fold)
    return (*args, 1, 2, window, per_head)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(_opcheck_case(True, True, 0), id="fold_per_head"),
        pytest.param(_opcheck_case(False, False, 6), id="evict_shared_window"),
    ],
)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.kvslim.select_one.default, args)
