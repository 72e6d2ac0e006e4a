"""``benchmarks/merged_slots.py``: the largest slot's span against the cache's cardinalities,
and its attention shares against HF's own attention probabilities."""

from __future__ import annotations

import merged_slots
import torch
from helpers import kv_model, prompts
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model


@settings(max_examples=6, deadline=None, derandomize=True)
@given(length=st.integers(30, 120), budget=st.integers(8, 24), seed=st.integers(0, 2**16))
def test_largest_slot_spans_as_many_positions_as_it_holds_tokens(length, budget, seed):
    model = kv_model("llama", "kvslimmer", budget, chunk_size=16)
    ids, mask = prompts(1, length, seed=seed)
    model.reset(batch_size=1, max_length=length)
    model(ids, mask)
    model.end_prompt()
    # Raises unless, in position order, the slots' cardinalities tile the positions.
    spans = merged_slots.largest_slots(model)
    for layer, heads in zip(model.layers, spans, strict=True):
        tokens = layer.log_cardinality()[0].exp().round().amax(-1)  # [H_kv]
        assert [hi - lo + 1 for lo, hi in heads] == tokens.long().tolist()
        assert all(0 <= lo <= hi < length for lo, hi in heads)


def test_attention_shares_are_the_models_attention_probabilities():
    hf = tiny_model("llama")
    hf.set_attn_implementation("eager")  # the one that returns its probabilities
    cfg = hf.config
    H_kv, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    ids, _ = prompts(1, 40)
    first = 25
    regions = [[(h, 2 + h + layer, 20 + h) for h in range(H_kv)] + [(None, 4, 30)]
               for layer in range(cfg.num_hidden_layers)]  # fmt: skip
    shares = merged_slots.attention_shares(hf, ids, first, regions)
    with torch.no_grad():
        probs = hf(ids, output_attentions=True).attentions  # per layer [1, H_q, T, T]
    for p, layer_regions, layer_shares in zip(probs, regions, shares, strict=True):
        heads = [slice(h * group, (h + 1) * group) for h in range(H_kv)] + [slice(None)]
        expected = [p[0, h, first:, lo : hi + 1].sum(-1).mean().item()
                    for h, (_, lo, hi) in zip(heads, layer_regions, strict=True)]  # fmt: skip
        torch.testing.assert_close(torch.tensor(layer_shares), torch.tensor(expected))
