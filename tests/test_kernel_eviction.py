"""``kvslim::evict_one``: the reference against a per-row Python model of its rule, the Triton
kernel (under ``TRITON_INTERPRET=1`` without a GPU) against the reference, and ``opcheck``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvslim_fx.kernels import eviction_triton
from kvslim_fx.kernels.eviction import evict_one_reference
from kvslim_fx.kernels.eviction_triton import evict_one_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_INTERPRETED = type(eviction_triton._evict_one).__name__ == "InterpretedFunction"
needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not _INTERPRETED,
    reason="no CUDA and kvslim_fx.kernels was imported before TRITON_INTERPRET=1 was set",
)


def make_case(
    B: int,
    H: int,
    C: int,
    D: int,
    seed: int,
    *,
    fold: bool = True,
    shared: bool = False,
    dtype: torch.dtype = torch.float32,
    noncontig: bool = False,
) -> list:
    """Random ``evict_one`` tensor arguments: mostly full caches of distinct positions below the
    row's next one (a pad for some rows), scores from a few values (ties), zero weights."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

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
    if noncontig:  # slices of bigger buffers, heads-last layouts
        cache_k = randn(B, C + 1, H, D).transpose(1, 2)
        cache_v = randn(B, H, C + 3, 2 * D)[:, :, 1 : C + 2, ::2]
        cache_pos = pos.transpose(1, 2).contiguous().transpose(1, 2)
        k, v = randn(B, 1, H, D).transpose(1, 2), randn(B, 1, H, D).transpose(1, 2)
        kv_pos = torch.cat([kv_pos, kv_pos], dim=1)[:, :1]
        score = score.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        cache_k, cache_v, cache_pos = randn(B, H, C + 1, D), randn(B, H, C + 1, D), pos
        k, v = randn(B, H, 1, D), randn(B, H, 1, D)
    args = [cache_k, cache_v, cache_pos, k, v, kv_pos, score, weight if fold else None]
    return [a if a is None else a.to(DEVICE) for a in args]


def clone(args: list) -> list:
    """Copies of the three mutated tensors (strides kept), the rest shared."""
    copies = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
              for a in args[:3]]  # fmt: skip
    return copies + args[3:]


def python_rule(args: list, sink: int, recent: int, window: int, per_head: bool) -> list:
    """The op's documented rule, one ``(row, head)`` at a time with Python lists."""
    cache_k, cache_v, cache_pos, k, v, kv_pos, score, weight = (
        a if a is None else a.cpu() for a in args
    )
    B, H, S, _ = cache_k.shape
    C = S - 1
    cache_k, cache_v, cache_pos = cache_k.clone(), cache_v.clone(), cache_pos.clone()
    slots, drops, fallbacks = [], [], []
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
            new_v = v[b, h, 0].to(cache_v.dtype)
            fallback = False
            later = [e for e, p in enumerate(pos) if drop >= 0 and p > pos[drop]]
            if weight is not None and later:
                r = min(later, key=lambda e: (pos[e], e))
                w_j, w_r = weight[b, h, drop], weight[b, h, r]
                total = w_j + w_r
                a, c = (w_j / total, w_r / total) if total > 0 else (0.5, 0.5)
                value = [cache_v[b, h, e] if e < C else new_v for e in (drop, r)]
                merged = (a * value[0].float() + c * value[1].float()).to(cache_v.dtype)
                if r < C:
                    cache_v[b, h, r] = merged
                else:
                    new_v = merged
                fallback = bool(total <= 0)
            free = [e for e in range(C) if pos[e] < 0]
            slot = drop if drop >= 0 else (free[0] if new >= 0 and free else C)
            cache_k[b, h, slot] = k[b, h, 0]
            cache_v[b, h, slot] = new_v
            cache_pos[b, h, slot] = new if slot < C else -1
            slots.append(slot), drops.append(drop), fallbacks.append(fallback)
    shape = (B, H)
    return [
        torch.tensor(slots).view(shape),
        torch.tensor(drops).view(shape),
        torch.tensor(fallbacks).view(shape),
        cache_k,
        cache_v,
        cache_pos,
    ]


CASES = dict(
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    C=st.integers(1, 40),
    D=st.sampled_from([1, 4, 8, 12, 16]),
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
def test_reference_follows_the_rule(
    B, H, C, D, sink, recent, window, per_head, fold, shared, noncontig, seed
):
    args = make_case(B, H, C, D, seed, fold=fold, shared=shared, noncontig=noncontig)
    want = python_rule(args, sink, recent, window, per_head)
    got = clone(args)
    outs = evict_one_reference(*got, sink, recent, window, per_head)
    for x, y in zip([*outs, *got[:3]], want, strict=True):
        assert torch.equal(x.cpu(), y)


@needs_triton
@settings(max_examples=40, deadline=None, derandomize=True)
@given(**CASES, dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
def test_triton_matches_reference(
    B, H, C, D, sink, recent, window, per_head, fold, shared, noncontig, seed, dtype
):
    args = make_case(B, H, C, D, seed, fold=fold, shared=shared, dtype=dtype, noncontig=noncontig)
    want, got = clone(args), clone(args)
    want_outs = evict_one_reference(*want, sink, recent, window, per_head)
    outs = evict_one_triton(*got, sink, recent, window, per_head)
    assert outs[0].dtype == torch.long and outs[2].dtype == torch.bool
    for x, y in zip(outs, want_outs, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    if dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (GPUs round to nearest)
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=2**-7)
    elif _INTERPRETED:
        assert torch.equal(got[1], want[1])
    else:  # a GPU may contract the merge's multiply-add into one rounding
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)


def test_one_decode_step_by_hand():
    """Cache of 4 (positions 0, 2, 3, 1 in slots 0-3), new token at 4, sink 1, recent 1: the
    eligible ones are 1, 2, 3; 2 has the lowest score and folds into 3 with weights 1 : 3."""
    cache_k = torch.arange(5.0)[None, None, :, None].repeat(1, 1, 1, 2)
    cache_v = cache_k * 10
    cache_pos = torch.tensor([[[0, 2, 3, 1, -1]]])
    k, v = torch.full((1, 1, 1, 2), 7.0), torch.full((1, 1, 1, 2), 70.0)
    score = torch.tensor([[[0.0, 0.1, 0.5, 0.3, 0.0]]])  # slots, then the new token
    weight = torch.tensor([[[0.0, 1.0, 3.0, 0.0, 0.0]]])
    args = [cache_k, cache_v, cache_pos, k, v, torch.tensor([[4]]), score, weight]
    slot, drop, fallback = torch.ops.kvslim.evict_one(*args, 1, 1, 0, True)
    assert (slot.item(), drop.item(), fallback.item()) == (1, 1, False)
    assert cache_pos.tolist() == [[[0, 4, 3, 1, -1]]]
    assert cache_k[0, 0, :, 0].tolist() == [0, 7, 2, 3, 4]
    assert cache_v[0, 0, :, 0].tolist() == [0, 70, 10 / 4 + 3 * 20 / 4, 30, 40]


def _opcheck_case(fold: bool, per_head: bool, window: int) -> tuple:
    args = make_case(2, 3, 9, 8, seed=int(fold) + 2 * int(per_head), fold=fold)
    return (*args, 1, 2, window, per_head)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(_opcheck_case(True, True, 0), id="fold_per_head"),
        pytest.param(_opcheck_case(False, False, 6), id="evict_shared_window"),
    ],
)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.kvslim.evict_one.default, args)
