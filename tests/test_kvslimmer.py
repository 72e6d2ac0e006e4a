"""KVSlimmer on the cache: budget held through prefill and decode, tokens conserved, exactness."""

from __future__ import annotations

import math
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_model, kv_model, prefill_and_decode, prompts
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import kvslim_fx
from kvslim_fx import KVSlimError
from kvslim_fx.methods.kvslimmer import KVSlimmer


def test_budget_above_sequence_is_exactly_full():
    ids, mask = prompts(3, 90, [0, 4, 30], seed=8)
    full = prefill_and_decode(kv_model("llama", "full", 128, chunk_size=32), ids, mask, steps=10)
    slim = prefill_and_decode(
        kv_model("llama", "kvslimmer", 128, chunk_size=32, sink=4, recent=8), ids, mask, 10
    )
    # Equal to rounding: a merging layout's attention computes its scores explicitly (for the
    # mass) where full's runs the fused kernel.
    torch.testing.assert_close(slim, full, atol=1e-5, rtol=1e-5)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    config=st.sampled_from(
        [
            ("llama", 24, 4, 2, False, 0.0, True, "mean"),
            ("gpt2", 30, 0, 0, True, 7.0, False, "mean"),
            ("llama", 26, 2, 3, True, 0.0, False, "last"),
        ]
    ),
    length=st.integers(14, 40),
    seed=st.integers(0, 99),
)
def test_decode_pair_merge_equals_the_general_merge(config, length, seed):
    """Decode's two-slot fast path leaves the cache bit-identical to the general run merge."""
    arch, budget, sink, recent, per_head, recency, convex, score = config
    model = kv_model(arch, "kvslimmer", budget, chunk_size=16, sink=sink, recent=recent,
                     per_head=per_head, recency=recency, convex=convex, score=score)  # fmt: skip
    ids, mask = prompts(2, length, [0, length // 3], seed=seed)

    def run() -> tuple[torch.Tensor, dict]:
        # Past the budget in decode, so pairs merge one step at a time.
        logits = prefill_and_decode(model, ids, mask, steps=budget + 6 - min(length, budget))
        return logits, {n: buf.clone() for n, buf in model.named_buffers()}

    fast_logits, fast = run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KVSlimmer, "_pair", KVSlimmer._pairs)
        general_logits, general = run()
    assert torch.equal(fast_logits, general_logits)
    assert fast.keys() == general.keys()
    for name, buf in fast.items():
        assert torch.equal(buf, general[name]), name
    assert model.layers[0].merge_stats[0] > 0


def test_decode_past_the_budget_keeps_generating_sensibly():
    model = kv_model("llama", "kvslimmer", 40, chunk_size=16, sink=4, recent=4)
    full = kv_model("llama", "full")
    ids, mask = prompts(2, 30, [0, 3], seed=9)
    out = kvslim_fx.generate(model, ids, mask, max_new_tokens=40, eos_token_id=[])
    ref = kvslim_fx.generate(full, ids, mask, max_new_tokens=40, eos_token_id=[])
    # Identical while everything fits, then merging starts (30 + 10 = 40 slots).
    assert torch.equal(out[:, : 30 + 11], ref[:, : 30 + 11])
    assert model.layers[0].merge_stats[0] > 0
    assert int((model.layers[0].pos[:, :, :40] >= 0).sum(-1).max()) == 40


def test_long_chunks_are_split_to_what_a_budget_can_free():
    model = kv_model("llama", "kvslimmer", 48, chunk_size=512, sink=4, recent=8)
    model.reset(batch_size=1, max_length=200)
    assert model.chunk_size == (48 - 4 - 8 - 1) // 4  # merge_fraction=0.25 of the mergeable pairs
    model = kv_model("llama", "kvslimmer", 48, chunk_size=512, merge_fraction=0.5)
    model.reset(batch_size=1, max_length=200)
    assert model.chunk_size == (48 - 3 - 24 - 1) // 2  # sinks: a sixteenth of 48; recent: half
    with pytest.raises(KVSlimError, match="leaves no room to compress"):
        kv_model("llama", "kvslimmer", 12, sink=4, recent=8).reset(batch_size=1)
    # A budget covering the sequence never merges: chunks keep their requested size.
    model.reset(batch_size=1, max_length=40)
    assert model.chunk_size == 512


@pytest.mark.parametrize(
    ("budget", "sink", "recent"),
    [(7, 1, 1), (16, 1, 8), (64, 4, 32), (512, 32, 256), (4096, 32, 2048)],
)
def test_sink_and_recent_scale_with_small_budgets(budget, sink, recent):
    method = KVSlimmer(budget)
    assert method.sink_for(budget) == sink
    assert method.recent_for(budget) == recent  # half, leaving the 4 pairs one merge needs
    assert method.recent_for(budget, rounds=True) == sink  # a full prefill's: a sixteenth
    assert method.max_chunk(budget) >= 1
    assert KVSlimmer(6).max_chunk(6) == 0  # the smallest budget the defaults accept is 7


@settings(max_examples=40, deadline=None)
@given(
    budget=st.integers(7, 64),
    fraction=st.sampled_from([0.125, 0.25, 0.5]),
    length=st.integers(1, 160),
    chunk=st.integers(1, 64),
    steps=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_no_merge_event_takes_more_than_its_fraction_of_the_mergeable_pairs(
    budget, fraction, length, chunk, steps, seed
):
    """The schedule that cannot collapse: each event merges at most ``merge_fraction`` of the
    pairs it may merge, and (since that is at most half) only disjoint pairs."""
    from kvslim_fx.methods import kvslimmer as module

    events = []
    select = module.disjoint_cheapest

    def recording(edge, need):
        joined = select(edge, need)
        events.append(
            (joined.sum(-1), torch.isfinite(edge).sum(-1), joined[..., 1:] & joined[..., :-1])
        )
        return joined

    # Budgets too small for the fraction to merge one pair are refused unless nothing is merged.
    assume(KVSlimmer(budget, merge_fraction=fraction).max_chunk(budget) >= 1)
    model = kv_model("llama", "kvslimmer", budget, chunk_size=chunk, merge_fraction=fraction)
    ids, mask = prompts(2, length, [0, length // 3], seed=seed)
    with patch.object(module, "disjoint_cheapest", recording):
        prefill_and_decode(model, ids, mask, steps)
    for selected, mergeable, touching in events:
        assert (selected <= fraction * mergeable).all(), (selected, mergeable)
        assert not touching.any()


def test_bias_cap_limits_the_cardinality_attention_counts():
    logc = torch.tensor([1.0, 3.0, 10.0, 400.0]).log()
    assert torch.equal(KVSlimmer(bias_cap=math.inf).attention_logc(logc), logc)
    capped = KVSlimmer().attention_logc(logc).exp()  # the default: 5
    torch.testing.assert_close(capped, torch.tensor([1.0, 3.0, 5.0, 5.0]))
    assert torch.equal(KVSlimmer(bias_cap=1).attention_logc(logc), torch.zeros(4))


def test_attention_value_weighs_each_pair_by_its_statistic():
    """``value="attention"`` (the default): each merged value is the members' mean weighted by
    their selection statistic (the token-weighted one where both are 0); ``"cardinality"``
    weighs by their tokens."""
    seen = []
    merge_plan = KVSlimmer._merge_plan

    def spy(self, plan, cache, first, second, do, score, alpha, out):
        merge_plan(self, plan, cache, first, second, do, score, alpha, out)
        card = cache.logc.exp()
        members = [(score.gather(2, i), card.gather(2, i)) for i in (first, second)]
        seen.append((self.value, members, plan.merge.value, do))

    ids, mask = prompts(2, 40, [0, 5], seed=4)
    with patch.object(KVSlimmer, "_merge_plan", spy):
        for value in ("attention", "cardinality"):
            model = kv_model("llama", "kvslimmer", 24, chunk_size=8, sink=2, recent=3, value=value)
            prefill_and_decode(model, ids, mask, steps=3)
    assert {value for value, *_ in seen} == {"attention", "cardinality"}
    for value, ((s1, c1), (s2, c2)), (w1, w2), do in seen:
        weight = c1 / (c1 + c2)
        if value == "attention":
            weight = torch.where(s1 + s2 > 0, s1 / (s1 + s2), weight)
        torch.testing.assert_close(w1[do], weight[do])
        torch.testing.assert_close(w1 + w2, torch.ones_like(w1))


def test_options_are_checked():
    with pytest.raises(KVSlimError, match="recent must be a non-negative integer"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, recent=-1)
    with pytest.raises(KVSlimError, match="recency must be a number >= 0"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, recency=-1.0)
    with pytest.raises(KVSlimError, match="bias_cap must be a number >= 1"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, bias_cap=0.5)
    with pytest.raises(KVSlimError, match="score must be one of mean, last"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, score="max")
    with pytest.raises(KVSlimError, match="value must be one of attention, cardinality"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, value="sum")
    with pytest.raises(KVSlimError, match="budget=32 must exceed sink=32"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 32, sink=32)
    with pytest.raises(KVSlimError, match=r"merge_fraction must lie in \(0, 0.5\]"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, merge_fraction=0.75)
    with pytest.raises(KVSlimError, match="observe must be a positive integer"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, observe=0)
    with pytest.raises(KVSlimError, match="kernel must be a positive odd integer"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, kernel=4)


def _reference_proxy(probs, card, values, sink):
    """A port of the reference code's Hessian proxy (``build_hessian_proxy_from_ratio``), with
    the paper's L2 norm in place of its L1: ``probs [B, H_q, Q, T]`` (per-token probabilities of
    the chunk's queries over the cached slots), ``card [B, H_kv, T]``, value sums
    ``values [B, H_kv, T, D]``."""
    B, Hkv, T, _ = values.shape
    mass = probs.sum(-2).view(B, Hkv, -1, T).mean(2)  # over queries, then a KV group's heads
    a = mass[..., sink:] * card[..., sink:]
    alpha = a / a.sum(-1, keepdim=True)
    out = (alpha[..., None] * values[..., sink:, :]).sum(2)
    dev = (values[..., sink:, :] - out[:, :, None]).norm(dim=-1)
    h = torch.zeros(B, Hkv, T, dtype=values.dtype)
    h[..., sink:] = alpha * (1 - 2 * alpha) * dev
    return h


@settings(max_examples=100, deadline=None)
@given(
    T=st.integers(3, 24),
    sink=st.integers(0, 2),
    G=st.sampled_from([1, 2, 3]),
    Q=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_hessian_proxy_is_normalised_like_the_reference(T, sink, G, Q, seed):
    """Single-token slots (value sums = means): the proxy equals the reference's, with the
    attention renormalised over the non-sink slots."""
    from kvslim_fx.kernels.run_merge import hessian_proxy

    from kvslim_fx.methods.kvslimmer import middle_output

    g = torch.Generator().manual_seed(seed)
    B, Hkv, D = 2, 2, 5
    probs = torch.randn(B, Hkv * G, Q, T, generator=g, dtype=torch.float64).softmax(-1)
    values = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    # What the attention op reports: mass summed over queries and heads, per query row.
    prob = probs.sum(-2).view(B, Hkv, G, T).sum(2) / (Q * G)
    middle = torch.arange(T) >= sink
    alpha, out = middle_output(prob, middle.expand(B, Hkv, T), values)
    h = hessian_proxy(alpha, values, out)
    ref = _reference_proxy(probs, torch.ones(B, Hkv, T, dtype=torch.float64), values, sink)
    torch.testing.assert_close(h, ref)


@settings(max_examples=60, deadline=None)
@given(
    C=st.integers(2, 40),
    kernel=st.sampled_from([1, 3, 7]),
    slots=st.integers(8, 64),
    seed=st.integers(0, 2**16),
)
def test_prompt_score_pools_the_attention_over_neighbours_in_position_order(C, kernel, slots,
                                                                          seed):  # fmt: skip
    """Slots in any memory order, some empty: each slot outside the protected sinks and recent
    window scores the max of its ``kernel`` position-order neighbours' attention among those
    slots (F.max_pool1d on the sorted row); protected and empty slots score 0."""
    g = torch.Generator().manual_seed(seed)
    method = KVSlimmer(kernel=kernel)
    pos = torch.randperm(3 * C, generator=g)[:C]
    pos[torch.rand(C, generator=g) < 0.2] = -1
    prob = torch.rand(C, generator=g, dtype=torch.float64)
    got = method.prompt_score(prob[None, None], pos[None, None], slots)[0, 0]

    sink, recent = method.sink_for(slots), method.recent_for(slots, rounds=True)
    order = pos.argsort()
    sp = pos[order]
    lend = (sp >= sink) & (sp <= sp.max() - recent)
    row = torch.where(lend, prob[order], -torch.inf)
    pooled = F.max_pool1d(row[None], kernel, stride=1, padding=kernel // 2)[0]
    want = torch.zeros_like(prob)
    want[order] = torch.where(lend, pooled, 0.0)
    assert torch.equal(got, want)
