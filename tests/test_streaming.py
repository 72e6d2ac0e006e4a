"""StreamingLLM: sinks plus a recent window, as a ring of slots and a visibility rule."""

from __future__ import annotations

import pytest
import torch
from helpers import kv_model, prompts
from hypothesis import given, settings
from hypothesis import strategies as st


def feed(model, ids, mask, chunk: int | None = None) -> torch.Tensor:
    """Logits of ``ids`` fed ``chunk`` tokens at a time (all at once if None)."""
    model.reset(batch_size=ids.shape[0], max_length=ids.shape[1])
    chunk = chunk or ids.shape[1]
    with torch.no_grad():
        out = [
            model(ids[:, i : i + chunk], mask[:, : i + chunk])
            for i in range(0, ids.shape[1], chunk)
        ]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_capacity_above_sequence_is_exactly_full(arch):
    ids, mask = prompts(3, 90, [0, 4, 30], seed=4)
    full = feed(kv_model(arch, "full", 96, chunk_size=32), ids, mask)
    streaming = feed(kv_model(arch, "streaming", 96, chunk_size=32, sink=4), ids, mask)
    assert torch.equal(full, streaming)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(budget=st.integers(8, 40), chunk=st.sampled_from([3, 16, 64]), length=st.integers(2, 100))
def test_chunked_prefill_equals_one_token_at_a_time(budget, chunk, length):
    ids, mask = prompts(2, length, [0, length // 3], seed=length)
    chunked = feed(
        kv_model("llama", "streaming", budget, chunk_size=chunk, sink=2), ids, mask, chunk
    )
    stepped = feed(kv_model("llama", "streaming", budget, chunk_size=1, sink=2), ids, mask, 1)
    real = mask.bool()
    assert (chunked - stepped).abs().amax(-1)[real].max() < 1e-5


def test_streaming_differs_from_full_once_it_evicts():
    ids, mask = prompts(1, 80, seed=5)
    full = feed(kv_model("llama", "full"), ids, mask)
    streaming = feed(kv_model("llama", "streaming", 24, sink=4), ids, mask)
    assert torch.allclose(full[:, :24], streaming[:, :24], atol=1e-5)
    assert (full[:, 30:] - streaming[:, 30:]).abs().max() > 1e-3


def test_cache_bytes_scale_with_budget():
    small = kv_model("llama", "streaming", 32, sink=4)
    small.reset(batch_size=1, max_length=400)
    full = kv_model("llama", "full")
    full.reset(batch_size=1, max_length=400)
    # K and V in fp32 plus an int32 position per slot and KV head (no cardinality: nothing
    # merges); full rounds 400 → 448.
    per_slot = 2 * 2 * (16 * 4 * 2 + 4)
    assert small.cache_bytes() == 32 * per_slot
    assert full.cache_bytes() == 448 * per_slot
