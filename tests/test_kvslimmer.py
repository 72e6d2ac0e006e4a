"""KVSlimmer on the cache: budget held through prefill and decode, tokens conserved, exactness."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import hf_model, kv_model, prefill_and_decode, prompts
from hypothesis import given, settings
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
    assert torch.equal(full, slim)


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
        patch.setattr(KVSlimmer, "_merge_pair", KVSlimmer._merge)
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
    assert model.chunk_size == 48 - 4 - 8 - 1
    with pytest.raises(KVSlimError, match="leaves no room to compress"):
        kv_model("llama", "kvslimmer", 12, sink=4, recent=8).reset(batch_size=1)


def test_bias_cap_limits_the_cardinality_attention_counts():
    logc = torch.tensor([1.0, 3.0, 10.0, 400.0]).log()
    assert torch.equal(KVSlimmer(bias_cap=math.inf).attention_logc(logc), logc)
    assert torch.equal(KVSlimmer().attention_logc(logc), torch.zeros(4))  # the default: 1
    capped = KVSlimmer(bias_cap=5).attention_logc(logc).exp()
    torch.testing.assert_close(capped, torch.tensor([1.0, 3.0, 5.0, 5.0]))
    assert torch.equal(KVSlimmer(bias_cap=1).attention_logc(logc), torch.zeros(4))


def test_options_are_checked():
    with pytest.raises(KVSlimError, match="recent must be a non-negative integer"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, recent=-1)
    with pytest.raises(KVSlimError, match="recency must be a number >= 0"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, recency=-1.0)
    with pytest.raises(KVSlimError, match="bias_cap must be a number >= 1"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, bias_cap=0.5)
    with pytest.raises(KVSlimError, match="score must be one of mean, last"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 64, score="max")
    with pytest.raises(KVSlimError, match="budget=32 must exceed sink=32"):
        kvslim_fx.transform(hf_model("llama"), "kvslimmer", 32)
