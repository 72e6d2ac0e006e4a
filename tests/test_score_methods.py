"""WeightedKV, H2O, TOVA and SnapKV: the paper's toy example, merge algebra, and each method's
kept slots against a direct reference that recomputes attention from the full logit matrix."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import kv_model, prefill_and_decode, prompts
from hypothesis import given, settings
from hypothesis import strategies as st
from kvslim_fx.passes.sdpa import AttentionSite

from kvslim_fx import KVSlimError
from kvslim_fx.cache import LayerCache
from kvslim_fx.methods import make_method
from kvslim_fx.methods.scoring import fold_right
from kvslim_fx.plan import Merge
from kvslim_fx.storage import Dense

METHODS = ("weightedkv", "h2o", "tova", "snapkv")


def layer_cache(
    method, budget: int, batch: int, hq: int, hkv: int, d: int, window: int = 0
) -> LayerCache:
    site = AttentionSite(layer=0, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d**-0.5,
                         window=window)  # fmt: skip
    cache = LayerCache(method, Dense(site))
    cache.allocate(batch, budget, torch.float32, torch.device("cpu"))
    return cache


def slot_of(cache: LayerCache, b: int, h: int) -> dict[int, int]:
    """Position → slot of the occupied slots of row ``b``, head ``h``."""
    pos = cache.pos[b, h, : cache.capacity].tolist()
    return {p: s for s, p in enumerate(pos) if p >= 0}


def test_a_merge_of_means_needs_the_policys_cardinalities():
    """Only a policy that declares ``logc`` keeps cardinalities; a merge that averages values
    (``Merge.counts``) without them is refused by name before anything is written."""
    cache = layer_cache(make_method("h2o", 8), 8, 1, 2, 1, 4)
    assert "logc" not in cache.slot_state and not cache.log_cardinality().any()
    one = torch.ones(1, 1, 1)
    slot = torch.zeros(1, 1, 1, dtype=torch.long)
    merge = Merge(src=slot, dst=slot + 1, do=one.bool(), value=(one / 2, one / 2), counts=True)
    before = cache.storage.v.clone()
    with pytest.raises(KVSlimError, match=r"'h2o' merges means .* declare 'logc'"):
        cache._merge(merge)
    assert torch.equal(cache.storage.v, before)


# --- WeightedKV: the paper's toy example and the merge algebra ---------------------------------

# Attention of each step's query over the tokens it sees (token number → weight), chosen so that
# the paper's toy example unfolds: cache of 4, v2 (avg 0.1) merges into v3 (avg 0.5) at step 5,
# and after step 8 the cache holds v3 and v6 (3 values each), v7, v8.
TOY = [
    {1: 1.0},
    {1: 0.6, 2: 0.4},
    {1: 0.0, 2: 0.0, 3: 1.0},
    {1: 0.0, 2: 0.0, 3: 0.3, 4: 0.7},
    {1: 0.0, 2: 0.0, 3: 0.2, 4: 0.4, 5: 0.4},
    {1: 0.0, 3: 0.3, 4: 0.1, 5: 0.5, 6: 0.1},
    {3: 0.2, 4: 0.0, 5: 0.2, 6: 0.55, 7: 0.05},
    {3: 0.2, 5: 0.0, 6: 0.2, 7: 0.55, 8: 0.05},
]


def paper_algorithm_1(steps: list[dict[int, float]], values: dict[int, torch.Tensor], m: int):
    """WeightedKV Algorithm 1 as written (lists, one merge per step, newest not eligible)."""
    toks, vals, acc, n = [], [], [], []
    for t, alpha in enumerate(steps, start=1):
        toks.append(t), vals.append(values[t].double()), acc.append(0.0), n.append(0)
        acc = [a + alpha[tok] for a, tok in zip(acc, toks, strict=True)]
        n = [x + 1 for x in n]
        if len(toks) > m:
            avg = [a / x for a, x in zip(acc, n, strict=True)]
            j = min(range(len(toks) - 1), key=lambda i: avg[i])
            vals[j + 1] = (avg[j] * vals[j] + avg[j + 1] * vals[j + 1]) / (avg[j] + avg[j + 1])
            for seq in (toks, vals, acc, n):
                del seq[j]
    return toks, vals


def test_weightedkv_reproduces_the_paper_toy_example():
    method = make_method("weightedkv", 4, sink=0, recent=1)
    cache = layer_cache(method, 4, batch=1, hq=1, hkv=1, d=8)
    values = {t: torch.eye(8)[t - 1] for t in range(1, 9)}  # v_t = e_t: merges show as weights
    keys = {t: torch.randn(8, generator=torch.Generator().manual_seed(t)) for t in range(1, 9)}
    for t, alpha in enumerate(TOY, start=1):
        mass = torch.zeros(1, 1, 4 + 1 + 1)  # 4 slots, trash, the new token
        for p, s in slot_of(cache, 0, 0).items():
            mass[0, 0, s] = alpha[p + 1]
        mass[0, 0, -1] = alpha[t]
        kv = (keys[t].view(1, 1, 1, 8), values[t].view(1, 1, 1, 8))
        cache.store(*kv, torch.tensor([[t - 1]]), mass)
        slots = slot_of(cache, 0, 0)
        assert len(slots) == min(t, 4)
        for p, s in slots.items():
            assert torch.equal(cache.storage.k[0, 0, s], keys[p + 1])  # keys are never modified
            assert cache.steps[0, 0, s] == t - p  # steps attended since insertion
        if t == 5:
            assert sorted(slots) == [0, 2, 3, 4]  # v2 merged into v3 ...
            expected = values[2] / 6 + 5 * values[3] / 6  # ... as v2/6 + 5 v3/6
            assert torch.allclose(cache.storage.v[0, 0, slots[2]], expected, atol=1e-6)
    slots = slot_of(cache, 0, 0)
    assert sorted(p + 1 for p in slots) == [3, 6, 7, 8]
    support = {p + 1: set((cache.storage.v[0, 0, s].nonzero().flatten() + 1).tolist()) for p, s in
               slots.items()}  # fmt: skip
    assert support == {3: {1, 2, 3}, 6: {4, 5, 6}, 7: {7}, 8: {8}}
    toks, vals = paper_algorithm_1(TOY, values, m=4)
    assert toks == [3, 6, 7, 8]
    for tok, val in zip(toks, vals, strict=True):
        assert torch.allclose(cache.storage.v[0, 0, slots[tok - 1]].double(), val, atol=1e-6)
    # 4 folds, no fallback, at most one per step, no merged run (WeightedKV keeps no cardinality).
    assert cache.merge_stats.tolist() == [4.0, 0.0, 1.0, 0.0]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(2, 12),
    drops=st.lists(st.booleans(), min_size=12, max_size=12),
    zeros=st.lists(st.booleans(), min_size=12, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_fold_weights_are_convex_and_merged_values_stay_in_range(n, drops, zeros, seed):
    g = torch.Generator().manual_seed(seed)
    drop = torch.tensor([*drops[: n - 1], False])  # the newest entry is never dropped
    weight = torch.rand(n, generator=g) * ~torch.tensor(zeros[:n])  # zeros: vanishing attention
    values = torch.randn(n, 5, generator=g)
    # Values = the identity: a receiving entry's folded value is its weight vector.
    weights, _ = fold_right(torch.eye(n)[None, None], weight[None, None], drop[None, None])
    merged, fallback = fold_right(values[None, None], weight[None, None], drop[None, None])
    weights, merged, fallback = weights[0, 0], merged[0, 0], fallback[0, 0]
    start = 0
    for j in range(n):
        if drop[j]:
            continue
        run = list(range(start, j + 1))
        start = j + 1
        if len(run) == 1:
            assert torch.equal(merged[j], values[j])  # untouched, bit for bit
            continue
        w = weights[j]
        assert (w >= 0).all() and math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
        assert (w[[i for i in range(n) if i not in run]] == 0).all()  # only the run
        total = float(weight[run].sum())
        assert bool(fallback[j]) == (total == 0)
        if total > 0:
            assert torch.allclose(w[run], weight[run] / total, atol=1e-6)
        lo, hi = values[run].amin(0), values[run].amax(0)
        assert ((merged[j] >= lo - 1e-6) & (merged[j] <= hi + 1e-6)).all()
        if len(run) == 2 and total > 0:  # the paper's pair formula
            a, b = weight[run[0]], weight[run[1]]
            pair = (a * values[run[0]] + b * values[run[1]]) / (a + b)
            assert torch.allclose(merged[j], pair, atol=1e-6)


def test_ideal_merge_reproduces_the_uncompressed_output():
    g = torch.Generator().manual_seed(3)
    for t in (2, 3, 9):
        q, keys, vals = (torch.randn(*s, generator=g, dtype=torch.float64) for s in
                         ((16,), (t, 16), (t, 4)))  # fmt: skip
        s = keys @ q / 4
        e = s.exp()
        Z = e.sum()
        out = torch.softmax(s, 0) @ vals
        # Drop k1, replace v2 so that the current output is unchanged (paper eq. for ṽ).
        r = (s[0] - s[1]).exp()
        ideal = (1 - e[0] / Z) * (r * vals[0] + vals[1]) - r / Z * (e[2:, None] * vals[2:]).sum(0)
        merged = torch.cat([ideal[None], vals[2:]])
        assert torch.allclose(torch.softmax(s[1:], 0) @ merged, out, rtol=0, atol=1e-12)
        # Its convex approximation ṽ ≈ (e1 v1 + e2 v2) / (e1 + e2) (dropping the tail term) errs
        # by no more than the dropped token's attention times the spread of the values.
        approx = (e[0] * vals[0] + e[1] * vals[1]) / (e[0] + e[1])
        got = torch.softmax(s[1:], 0) @ torch.cat([approx[None], vals[2:]])
        spread = (vals.amax(0) - vals.amin(0)).max()
        assert (got - out).abs().max() <= 2 * e[0] / Z * spread + 1e-12


# --- Each method's kept slots against a direct reference ---------------------------------------


class Reference:
    """One row's cache, recomputed from the full logit matrix ``S [H_q, T, T]`` with Python sets.

    Implements each method's documented rule directly: per step, every real query attends
    (softmax over the logits of the kept tokens and the chunk's tokens up to itself, within the
    layer's sliding ``window``); mass and seen counts accumulate; the lowest-scoring eligible
    tokens are dropped.
    """

    def __init__(self, method, budget, S, values, hkv, window):
        self.m, self.C, self.S, self.hkv, self.window = method, budget, S, hkv, window
        self.group = S.shape[0] // hkv
        self.recent = method.recent_for(budget)
        # Per KV head: position → {"v": value, "acc": ..., "steps": ...}.
        self.kept = [dict() for _ in range(hkv)]
        self.values = values  # [H_kv, T, D] by position

    def step(self, new: list[int]) -> list[tuple[list[int], list[int], dict[int, float]]]:
        """Feed positions ``new``; per head: (eligible, dropped, score) for the checks."""
        per_head = []
        for h in range(self.hkv):
            kept = self.kept[h]
            for p in new:
                kept[p] = {"v": self.values[h, p].double(), "acc": 0.0, "steps": 0.0}
            mass = dict.fromkeys(kept, 0.0)
            seen = dict.fromkeys(kept, 0.0)
            for i in new:
                visible = [p for p in kept if p <= i and not 0 < self.window <= i - p]
                for p in visible:
                    seen[p] += 1
                for g in range(h * self.group, (h + 1) * self.group):
                    probs = torch.softmax(self.S[g, i, visible].double(), 0)
                    for p, a in zip(visible, probs.tolist(), strict=True):
                        mass[p] += a
            for p in kept:
                kept[p]["acc"] += mass[p]
                kept[p]["steps"] += seen[p]
            score = {p: self.raw_score(kept[p], mass[p], seen[p]) for p in kept}
            newest = max(kept, default=-1)
            eligible = sorted(p for p in kept if self.m.sink <= p <= newest - self.recent)
            if self.m.name == "snapkv":  # max over the neighbouring eligible tokens
                r = self.m.kernel // 2
                score = {p: max(score[q] for q in eligible[max(0, i - r) : i + 1 + r])
                         for i, p in enumerate(eligible)}  # fmt: skip
            if self.window:  # out of the window for good: evicted first
                score |= {p: -math.inf for p in eligible if newest - p >= self.window}
            per_head.append((eligible, score))
        if not self.m.per_head:  # one selection per layer, by the head-mean score
            eligible = per_head[0][0]
            mean = {p: sum(s[p] for _, s in per_head) / self.hkv for p in eligible}
            per_head = [(eligible, mean)] * self.hkv
        out = []
        for h, (eligible, score) in enumerate(per_head):
            need = max(0, len(self.kept[h]) - self.C)
            dropped = sorted(eligible, key=lambda p: (score[p], p))[:need]
            out.append((eligible, dropped, score))
        return out

    def raw_score(self, entry, mass, seen) -> float:
        return {
            "weightedkv": entry["acc"] / max(entry["steps"], 1),
            "h2o": entry["acc"],
            "tova": mass / max(seen, 1),
            "snapkv": mass / max(seen, 1),
        }[self.m.name]

    def drop(self, h: int, dropped: set[int]) -> None:
        kept = self.kept[h]
        if self.m.name == "weightedkv":
            run = []
            for p in sorted(kept):
                if p in dropped:
                    run.append(p)
                elif run:
                    members = [*run, p]
                    w = [kept[q]["acc"] / max(kept[q]["steps"], 1) for q in members]
                    total = sum(w)
                    w = [x / total for x in w] if total > 0 else [1 / len(w)] * len(w)
                    kept[p]["v"] = sum(x * kept[q]["v"] for x, q in zip(w, members, strict=True))
                    run = []
        for p in dropped:
            del kept[p]


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    budget=st.integers(3, 8),
    sink=st.integers(0, 2),
    recent=st.integers(0, 3),
    length=st.integers(4, 20),
    pads=st.integers(0, 3),
    chunk=st.sampled_from([1, 1, 2, 3, 5]),
    per_head=st.booleans(),
    kernel=st.sampled_from([1, 3, 5]),
    sliding=st.sampled_from([False, False, True]),
    seed=st.integers(0, 2**16),
)
def test_kept_slots_match_a_direct_reference(
    name, budget, sink, recent, length, pads, chunk, per_head, kernel, sliding, seed
):
    recent = min(max(recent, int(name == "weightedkv")), budget - sink)
    options = {"window": recent, "kernel": kernel} if name == "snapkv" else {"recent": recent}
    method = make_method(name, budget, sink=sink, per_head=per_head, **options)
    B, HQ, HKV, D = 2, 4, 2, 8
    # A sliding layer whose window exceeds the budget: evicting, with old sinks out of sight.
    window = budget + 1 if sliding else 0
    cache = layer_cache(method, budget, B, HQ, HKV, D, window)
    g = torch.Generator().manual_seed(seed)
    T = length + pads  # timeline; row 1 starts with `pads` pad tokens
    q = 2 * torch.randn(B, HQ, T, D, generator=g)
    k = torch.randn(B, HKV, T, D, generator=g)
    v = torch.randn(B, HKV, T, D, generator=g)
    kv_pos = torch.stack([torch.arange(T), torch.arange(T) - pads]).clamp_min(-1)
    # Full logit matrices by position: [H_q, positions, positions].
    group = HQ // HKV
    refs = []
    for b in range(B):
        t = (kv_pos[b] >= 0).nonzero().flatten()
        S = torch.einsum("hid,hjd->hij", q[b][:, t], k[b].repeat_interleave(group, 0)[:, t])
        refs.append(Reference(method, budget, S * D**-0.5, v[b][:, t], HKV, window))
    for t0 in range(0, T, chunk):
        sl = slice(t0, t0 + chunk)
        cache(q[:, :, sl], k[:, :, sl], v[:, :, sl], kv_pos[:, sl])
        for b, ref in enumerate(refs):
            new = [p for p in kv_pos[b, sl].tolist() if p >= 0]
            for h, (eligible, dropped, score) in enumerate(ref.step(new)):
                slots = slot_of(cache, b, h)
                assert len(slots) == min(budget, int(kv_pos[b, : t0 + chunk].max()) + 1)
                gone = set(ref.kept[h]) - set(slots)
                assert set(slots) <= set(ref.kept[h])
                if gone != set(dropped):
                    # Only a tie (to float32 rounding) may be broken differently.
                    rest = [score[p] for p in eligible if p not in gone]
                    assert gone <= set(eligible) and len(gone) == len(dropped)
                    tol = 1e-4 * max(1.0, *(abs(x) for x in rest if math.isfinite(x)))
                    assert max(score[p] for p in gone) <= min(rest) + tol, (gone, dropped)
                ref.drop(h, gone)
                for p, s in slots.items():
                    t = p + (pads if b else 0)
                    assert torch.equal(cache.storage.k[b, h, s], k[b, h, t])  # keys never modified
                    entry = ref.kept[h][p]
                    assert torch.allclose(cache.storage.v[b, h, s].double(), entry["v"], atol=1e-5)
                    if "acc" in method.slot_state():
                        acc = float(cache.acc[b, h, s])
                        assert math.isclose(acc, entry["acc"], rel_tol=1e-4, abs_tol=1e-6)
                    if "steps" in method.slot_state():
                        assert cache.steps[b, h, s] == entry["steps"]
            if not method.per_head:
                assert torch.equal(cache.pos[b, 0], cache.pos[b, 1])


# --- Decode fast path (kvslim::evict_one) against the general path ---------------------------


def random_cache(method, budget, window, per_head, seed, B=2, HKV=2, D=8) -> tuple:
    """A cache in a state decoding could reach, and the next token's position: mostly full,
    distinct positions below it, accumulators from a few values (ties); with ``per_head=False``
    every head has the same layout, as that method keeps it."""
    g = torch.Generator().manual_seed(seed)
    cache = layer_cache(method, budget, B, 2 * HKV, HKV, D, window)
    nxt = budget + int(torch.randint(0, 2 * budget, (1,), generator=g))
    for b in range(B):
        for h in range(HKV):
            if not per_head and h:
                cache.pos[b, h] = cache.pos[b, 0]
                continue
            full = bool(torch.rand(1, generator=g) < 0.8)
            n = budget if full else int(torch.randint(0, budget, (1,), generator=g))
            slots = torch.randperm(budget, generator=g)[:n]
            cache.pos[b, h, slots] = torch.randperm(nxt, generator=g, dtype=cache.pos.dtype)[:n]
    cache.storage.k.copy_(torch.randn(cache.storage.k.shape, generator=g))
    cache.storage.v.copy_(torch.randn(cache.storage.v.shape, generator=g))
    real = cache.pos >= 0
    for name in method.slot_state():
        values = torch.tensor([0.0, 0.5, 1.0, 3.0])[torch.randint(0, 4, real.shape, generator=g)]
        getattr(cache, name).copy_(torch.where(real, values, 0.0))
    return cache, nxt


def by_position(cache: LayerCache, b: int, h: int) -> dict[int, list]:
    """Position → the slot's key, value and accumulators."""
    state = [cache.storage.k, cache.storage.v,
             *(getattr(cache, n) for n in cache.method.slot_state())]  # fmt: skip
    return {p: [x[b, h, s].tolist() for x in state] for p, s in slot_of(cache, b, h).items()}


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    budget=st.integers(2, 10),
    sink=st.integers(0, 3),
    recent=st.integers(0, 4),
    per_head=st.booleans(),
    kernel=st.sampled_from([1, 3, 5]),
    sliding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decode_fast_path_equals_the_general_path(
    name, budget, sink, recent, per_head, kernel, sliding, seed
):
    sink = min(sink, budget - 1)
    recent = min(max(recent, int(name == "weightedkv")), budget - sink)
    options = {"window": recent, "kernel": kernel} if name == "snapkv" else {"recent": recent}
    method = make_method(name, budget, sink=sink, per_head=per_head, **options)
    forced = make_method(name, budget, sink=sink, per_head=per_head, **options)
    forced.plan_one = forced.plan  # the general path, even for one token
    window = budget + 2 if sliding else 0
    fast, nxt = random_cache(method, budget, window, per_head, seed)
    general, _ = random_cache(forced, budget, window, per_head, seed)
    g = torch.Generator().manual_seed(seed)
    B, HKV, C = 2, 2, budget
    for t in range(nxt, nxt + 3):
        k, v = torch.randn(B, HKV, 1, 8, generator=g), torch.randn(B, HKV, 1, 8, generator=g)
        kv_pos = torch.tensor([[t], [t if torch.rand(1, generator=g) < 0.7 else -1]])
        # Mass from a few values (ties, zero weights), none for empty slots or a pad.
        levels = torch.tensor([0.0, 0.25, 0.5, 1.0])
        mass = levels[torch.randint(0, 4, (B, HKV, C + 2), generator=g)]
        mass[..., :C] *= fast.pos[..., :C] >= 0
        mass[..., C] = 0
        mass[..., C + 1] *= kv_pos >= 0
        for cache in (fast, general):
            cache.store(k, v, kv_pos, mass)
        assert torch.equal(fast.pos[..., :C], general.pos[..., :C])  # even the same slots
        for b in range(B):
            for h in range(HKV):
                assert by_position(fast, b, h) == by_position(general, b, h)
        assert torch.equal(fast.merge_stats, general.merge_stats)


# --- On a model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_on_a_model_the_budget_holds_and_a_fitting_sequence_is_exactly_full(name):
    # Budget 12 < gemma3's window 16: the sliding layers evict too, under their window.
    options = {"window": 4} if name == "snapkv" else {}
    model = kv_model("gemma3_text", name, 12, chunk_size=16, **options)
    ids, mask = prompts(2, 9, [0, 3], seed=5)  # 9 + 3 decode steps fit in 12 slots
    full = prefill_and_decode(
        kv_model("gemma3_text", "full", 12, chunk_size=16), ids, mask, steps=3
    )
    # To rounding: the scoring methods' attention computes explicit scores, full's is fused.
    torch.testing.assert_close(prefill_and_decode(model, ids, mask, steps=3), full, atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    assert all(layer.merge_stats[0] == 0 for layer in model.layers)

    ids, mask = prompts(2, 37, [0, 5], seed=2)
    prefill_and_decode(model, ids, mask, steps=5)
    consumed = (mask.sum(1) + 5).tolist()
    for layer in model.layers:
        assert layer.capacity == 12 and layer.layout.merges
        pos = layer.pos[:, :, :12]
        assert ((pos >= 0).sum(-1) == 12).all()
        assert int(layer.merge_stats[0]) == 2 * (sum(consumed) - 2 * 12)  # heads × overflow
        for b, n in enumerate(consumed):
            if name != "tova":  # TOVA may evict even the newest token
                assert pos[b].max() == n - 1
            assert (pos[b] < 4).sum() == 2 * min(4, n)  # sinks of both heads


@pytest.mark.parametrize("name", METHODS)
def test_update_compiles_to_one_graph(name):
    method = make_method(name, 6, sink=1, **({"window": 2} if name == "snapkv" else {}))
    cache = layer_cache(method, 6, batch=2, hq=4, hkv=2, d=8)
    torch._dynamo.reset()
    compiled = torch.compile(cache, fullgraph=True, backend="eager", dynamic=False)
    g = torch.Generator().manual_seed(0)
    for start, L in ((0, 5), (5, 3), (8, 1), (9, 1)):
        q = torch.randn(2, 4, L, 8, generator=g)
        k, v = torch.randn(2, 2, L, 8, generator=g), torch.randn(2, 2, L, 8, generator=g)
        compiled(q, k, v, torch.arange(start, start + L).expand(2, L))
    assert ((cache.pos[:, :, :6] >= 0).sum(-1) == 6).all()


def test_options_are_checked_and_recorded():
    for name in METHODS:
        method = make_method(name, 32)
        assert type(make_method(name, **method.options())) is type(method)
        assert method.sink == 4
    assert make_method("weightedkv", 1024).recent_for(1024) == 508  # paper: 4 sinks + 508 recent
    assert make_method("weightedkv", 256).recent_for(256) == 124
    assert make_method("h2o", 64).recent_for(64) == 32
    assert make_method("tova", 64).recent_for(64) == 0
    assert not make_method("tova", 64).per_head
    with pytest.raises(KVSlimError, match="weightedkv needs recent >= 1"):
        make_method("weightedkv", 16, recent=0)
    with pytest.raises(KVSlimError, match="kernel must be a positive odd integer"):
        make_method("snapkv", 64, kernel=4)
    with pytest.raises(KVSlimError, match="recent must be a non-negative integer"):
        make_method("h2o", 64, recent=-1)
    # 4 sinks + a window of 32 leave no room in 32 slots: the model refuses to reset.
    assert make_method("snapkv", 32).max_chunk(32) == 0
    assert make_method("snapkv", 36).max_chunk(36) is None
