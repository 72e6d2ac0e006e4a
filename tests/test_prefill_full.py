"""``prefill="full"``: the cache holds the prompt, then one question-aware compression to budget.

The kept tokens are checked against a reference computed from the HF model's own attention
probabilities (eager attention, ``output_attentions``): the methods' scores by the prompt's last
``prefill_window`` queries, as SnapKV, TOVA and H2O define them.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_model, prompts, smallest_budget, transform_reusing_trace
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kvslim_fx
from kvslim_fx import KVSlimError
from kvslim_fx.transform import DEFAULT_CHUNK

WINDOW = 8  # prefill_window of these tests
PROMPT, BUDGET = 100, 40


@functools.cache
def attentions(arch: str, seed: int) -> tuple[torch.Tensor, ...]:
    """The HF model's attention probabilities ``[H_q, P, P]`` per layer on one prompt."""
    model = copy.deepcopy(hf_model(arch))
    model.set_attn_implementation("eager")
    ids, _ = prompts(1, PROMPT, seed=seed)
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=False)
    return tuple(a[0].double() for a in out.attentions)


def window_scores(
    probs: torch.Tensor, kv_heads: int, last: int = WINDOW
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass of the ``last`` queries on each key, per KV head, and the query rows that could see
    it: ``[H_kv, P]`` each."""
    H, P, _ = probs.shape
    G = H // kv_heads
    mass = probs[:, -last:].sum(1).view(kv_heads, G, P).sum(1)
    queries = torch.arange(P - last, P)
    seen = (queries[:, None] >= torch.arange(P)[None]).sum(0).double() * G
    return mass, seen.expand(kv_heads, P)


def expected_kept(score: torch.Tensor, eligible: torch.Tensor, budget: int) -> list[set[int]]:
    """Per head, the positions left after dropping the lowest-scoring eligible ones."""
    need = score.shape[-1] - budget
    ranked = torch.where(eligible, score, torch.inf).argsort(dim=-1, stable=True)
    return [set(range(score.shape[-1])) - set(row[:need].tolist()) for row in ranked]


def reference(name: str, probs: torch.Tensor, kv_heads: int) -> list[set[int]]:
    P = probs.shape[-1]
    pos = torch.arange(P)
    sink = 4
    mass, seen = window_scores(probs, kv_heads)
    if name == "snapkv":
        eligible = (pos >= sink) & (pos <= P - 1 - 32)  # the default 32-token window
        now = torch.where(eligible, mass / seen, -torch.inf)
        pooled = F.max_pool1d(now[:, None], 7, stride=1, padding=3)[:, 0]
        return expected_kept(torch.where(eligible, pooled, 0.0), eligible, BUDGET)
    if name == "tova":  # the prompt's last query; one selection per layer: summed over the heads
        eligible = pos >= sink
        mass, seen = window_scores(probs, kv_heads, last=1)
        score = (mass / seen).sum(0, keepdim=True).expand(kv_heads, P)
        return expected_kept(score, eligible, BUDGET)
    assert name == "h2o"  # attention accumulated over every query of the prompt
    eligible = (pos >= sink) & (pos <= P - 1 - BUDGET // 2)
    acc = probs.sum(1).view(kv_heads, -1, P).sum(1)
    return expected_kept(acc, eligible, BUDGET)


@pytest.mark.parametrize("name", ["snapkv", "tova", "h2o"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_kept_tokens_are_the_methods_choice_by_the_prompts_last_queries(name, seed):
    model = transform_reusing_trace(
        hf_model("llama"), name, BUDGET, chunk_size=32, prefill="full", prefill_window=WINDOW
    )
    ids, mask = prompts(1, PROMPT, seed=seed)
    model.reset(batch_size=1, max_length=PROMPT + 4, prompt_len=PROMPT)
    assert [layer.capacity for layer in model.layers] == [128, 128]  # the prompt, rounded up
    with torch.no_grad():
        model(ids, mask)
    model.end_prompt()
    for layer, probs in zip(model.layers, attentions("llama", seed), strict=True):
        assert layer.capacity == BUDGET
        H = layer.site.num_kv_heads
        want = reference(name, probs, H)
        got = [set(layer.pos[0, h, :BUDGET].tolist()) for h in range(H)]
        assert got == want


def test_streaming_keeps_its_sinks_and_the_newest_tokens_in_their_ring_slots():
    model = transform_reusing_trace(
        hf_model("llama"), "streaming", BUDGET, chunk_size=DEFAULT_CHUNK, prefill="full"
    )
    ids, mask = prompts(1, PROMPT, seed=3)
    out = kvslim_fx.generate(model, ids, mask, max_new_tokens=5, eos_token_id=[])
    bounded = transform_reusing_trace(
        hf_model("llama"), "streaming", BUDGET, chunk_size=DEFAULT_CHUNK
    )
    ref = kvslim_fx.generate(bounded, ids, mask, max_new_tokens=5, eos_token_id=[])
    for layer, other in zip(model.layers, bounded.layers, strict=True):
        # After the prompt and 5 decode steps both hold the same tokens in the same slots.
        assert torch.equal(layer.pos, other.pos)
    assert out.shape == ref.shape


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["streaming", "kvslimmer", "weightedkv", "h2o", "tova", "snapkv"]),
    arch=st.sampled_from(["llama", "gemma3_text", "gpt2"]),
    budget=st.integers(12, 60),
    length=st.integers(1, 120),
    pads=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    steps=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
@example(name="kvslimmer", arch="gemma3_text", budget=12, length=17, pads=[0], steps=0, seed=0)
@example(name="snapkv", arch="llama", budget=12, length=32, pads=[0, 0, 1], steps=0, seed=0)
def test_after_the_prompt_every_layer_holds_the_budget(name, arch, budget, length, pads, steps,
                                                       seed):  # fmt: skip
    # generate sizes the cache for the padded width: length + the widest padding + steps.
    budget = max(budget, smallest_budget(name, {}, length + max(pads) + steps))
    model = transform_reusing_trace(hf_model(arch), name, budget, chunk_size=16, prefill="full")
    ids, mask = prompts(len(pads), length + max(pads), [p for p in pads], seed=seed)
    out = kvslim_fx.generate(model, ids, mask, max_new_tokens=steps, eos_token_id=[])
    assert not model.prompt_pending
    P = int(mask.sum(1).max())
    for layer in model.layers:
        C = layer.capacity
        assert budget >= C or P + steps <= C  # the budget, or the sequence fits
        occupied = layer.pos[:, :, :C] >= 0
        assert int(occupied.sum(-1).max()) <= C
        if name == "kvslimmer" and layer.layout.merges:
            # Every token fed is in exactly one slot (generate never feeds its last token); a
            # sliding-window layer may drop what its window no longer sees.
            cards = (layer.log_cardinality()[:, :, :C].exp() * occupied).sum(-1).double()
            seen = (mask.sum(1) + max(steps - 1, 0)).double()[:, None].expand_as(cards)
            if layer.site.window:
                assert bool((cards <= seen + 1e-3).all())
            else:
                torch.testing.assert_close(cards, seen, atol=1e-3, rtol=0)
            assert layer.merge_stats[3] <= 2  # disjoint pairs only
    assert out.shape[1] <= ids.shape[1] + steps


def test_kvslimmer_merges_the_prompt_in_rounds_of_disjoint_pairs():
    model = transform_reusing_trace(
        hf_model("llama"), "kvslimmer", BUDGET, chunk_size=DEFAULT_CHUNK, prefill="full"
    )
    ids, mask = prompts(1, PROMPT, seed=4)
    kvslim_fx.generate(model, ids, mask, max_new_tokens=1, eos_token_id=[])
    for layer in model.layers:
        stats = layer.diagnostics()
        assert stats["occupied"] == BUDGET
        # 100 tokens into 40 slots, at most a quarter of the mergeable pairs per round.
        assert stats["merged"] >= 2 * (PROMPT - BUDGET) and stats["most_joined"] == 2
        assert stats["most_per_step"] <= (PROMPT - 3 - 3 - 1) // 4


def test_a_sequence_the_budget_covers_is_exactly_full():
    ids, mask = prompts(2, 30, [0, 5], seed=5)
    full = transform_reusing_trace(hf_model("llama"), "full", chunk_size=DEFAULT_CHUNK)
    ref = kvslim_fx.generate(full, ids, mask, max_new_tokens=6, eos_token_id=[])
    for name in ("kvslimmer", "snapkv"):
        model = transform_reusing_trace(
            hf_model("llama"), name, 64, chunk_size=DEFAULT_CHUNK, prefill="full"
        )
        assert torch.equal(kvslim_fx.generate(model, ids, mask, max_new_tokens=6, eos_token_id=[]),
                           ref)  # fmt: skip
        assert not model.prompt_pending


def test_bad_prefill_options_and_export_are_refused(tmp_path):
    with pytest.raises(KVSlimError, match="prefill must be one of bounded, full"):
        kvslim_fx.transform(hf_model("llama"), "tova", 32, prefill="question")
    with pytest.raises(KVSlimError, match="prefill_window must be a positive integer"):
        kvslim_fx.transform(hf_model("llama"), "tova", 32, prefill="full", prefill_window=0)
    model = kvslim_fx.transform(hf_model("llama"), "tova", 32, prefill="full")
    with pytest.raises(KVSlimError, match="export packages prefill='bounded' models"):
        kvslim_fx.export(model, tmp_path / "m.pt2")
