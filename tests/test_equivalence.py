"""Property 1 of the design: with nothing compressed the rewritten model *is* the original one.

Greedy tokens equal HF ``generate`` for every architecture (batch 3, left padding); sampling
and EOS follow HF's rules. The logits themselves (every architecture and method, drawn prompts,
chunk sizes, padding and budgets that fit the sequence: within 1e-5 of HF's) are a property in
test_properties.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hf_model, kv_model, prompts
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import ARCHS

import kvslim_fx
from kvslim_fx.generate import _sample

DECODE_STEPS = 30


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_hf_generate(arch):
    ids, mask = prompts(3, 100, [0, 7, 61], seed=1)
    with torch.no_grad():
        expected = hf_model(arch).generate(
            ids, attention_mask=mask, max_new_tokens=DECODE_STEPS, do_sample=False
        )
    got = kvslim_fx.generate(kv_model(arch), ids, mask, max_new_tokens=DECODE_STEPS)
    assert torch.equal(got, expected)


def test_top_k_one_sampling_is_greedy():
    model = kv_model("llama")
    ids, mask = prompts(2, 20, [0, 5], seed=2)
    greedy = kvslim_fx.generate(model, ids, mask, max_new_tokens=12)
    sampled = kvslim_fx.generate(
        model, ids, mask, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=1,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.equal(greedy, sampled)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    top_k=st.one_of(st.none(), st.integers(1, 12)),
    top_p=st.one_of(st.none(), st.floats(0.05, 0.99)),
    temperature=st.floats(0.3, 2.0),
)
def test_sampled_tokens_stay_in_the_top_k_and_the_nucleus(seed, top_k, top_p, temperature):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, 12, generator=g) * 3
    draws = torch.stack([_sample(scores, temperature, top_k, top_p, g) for _ in range(200)], 1)
    probs = (scores / temperature).softmax(-1)
    for row in range(4):
        order = probs[row].argsort(descending=True)
        allowed = set(order[: top_k or 12].tolist())
        if top_p is not None:
            # The nucleus: the most likely tokens until their mass reaches top_p (ties aside).
            kept = probs[row, order[: top_k or 12]]
            kept = kept / kept.sum() if top_k else kept
            n = int((kept.cumsum(0) < top_p).sum()) + 1
            allowed &= set(order[:n].tolist())
        assert set(draws[row].tolist()) <= allowed


def test_eos_stops_rows_and_pads_them():
    model = kv_model("llama")
    ids, mask = prompts(2, 10, seed=3)
    free = kvslim_fx.generate(model, ids, mask, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 12])  # the third generated token of row 0 becomes "EOS"
    got = kvslim_fx.generate(model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    row0 = got[0, 10:].tolist()
    first = row0.index(eos)
    assert all(t == 0 for t in row0[first + 1 :])
    assert torch.equal(got[:, : 10 + first + 1], free[:, : 10 + first + 1])


@pytest.mark.parametrize("arch", ARCHS)
def test_the_head_is_split_off_so_a_prompt_skips_logits_it_does_not_read(arch):
    # passes/head.py: the graph returns hidden states, the head maps the kept positions only.
    model = kv_model(arch)
    assert not isinstance(model.head, torch.nn.Identity)
    ids, mask = prompts(2, 40, [0, 6], seed=5)
    with torch.no_grad():
        model.reset()
        every = model(ids, mask)
        for keep in (1, 7, 40, 64):  # the chunks are 64 long: one chunk, then two
            model.reset()
            torch.testing.assert_close(model(ids, mask, logits_to_keep=keep), every[:, -keep:])
    with pytest.raises(kvslim_fx.KVSlimError, match="logits_to_keep"):
        model(ids, mask, logits_to_keep=-1)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 50), chunk=st.integers(1, 20), keep=st.integers(0, 60))
def test_logits_to_keep_across_chunks(length, chunk, keep):
    model = kv_model("llama", chunk_size=chunk)
    ids, mask = prompts(1, length, seed=length)
    with torch.no_grad():
        model.reset()
        every = model(ids, mask)
        model.reset()
        kept = model(ids, mask, logits_to_keep=keep)
    # The head's matmul over fewer rows may round differently (BLAS picks its kernel by size).
    torch.testing.assert_close(kept, every[:, -keep:] if keep else every, rtol=1e-5, atol=1e-6)
