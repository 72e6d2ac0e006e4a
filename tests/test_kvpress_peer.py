"""benchmarks/kvpress_peer.py without kvpress: names, tasks, rows, and the decode loops.

The loops run on a tiny random Llama with no press (they must reproduce the plain model) and with
a stand-in press that prunes the cache the way kvpress does (a hook after each attention layer
during prefill), checked against one masked forward pass: that pins the RoPE positions of the
decode steps through a cache shorter than the text.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import hf_model, table_rows
from tiny_models import EOS_TOKEN_ID, VOCAB_SIZE

from kvslim_fx.errors import KVSlimError
from kvslim_fx.eval.perplexity import reference_nll

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kvpress_peer.py"
_spec = importlib.util.spec_from_file_location("kvpress_peer", _PATH)
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)


def ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist()


def test_press_names_and_budgets():
    assert peer.parse_presses("none, tova,merging_snapkv,cam,tova") == [
        "none",
        "tova",
        "merging_snapkv",
        "cam",
    ]
    with pytest.raises(ValueError, match="unknown presses"):
        peer.parse_presses("tova,h2o")
    assert peer.parse_fractions("0.125,25%") == [0.125, 0.25]
    for bad in ("0", "1", "1.0", "1.5", "", "x"):
        with pytest.raises(KVSlimError, match="--budgets"):
            peer.parse_fractions(bad)
    assert peer.compression_ratio(0.1) == 0.9 and peer.compression_ratio(0.25) == 0.75
    # `none` is one cell whatever the budgets.
    assert peer.cells(["none", "knorm"], [0.25, 0.5]) == [
        ("none", 1.0),
        ("knorm", 0.25),
        ("knorm", 0.5),
    ]


def test_command_line():
    args = peer.parse_args(["--tasks", "t.json", "--presses", "none,tova", "--budgets", "0.25"])
    assert (args.presses, args.budgets, args.out) == (
        ["none", "tova"],
        [0.25],
        "benchmarks/results/kvpress.json",
    )
    with pytest.raises(SystemExit):
        peer.parse_args(["--tasks", "t.json", "--presses", "h2o"])


def test_make_press_none_needs_no_kvpress():
    assert peer.make_press("none", 1.0, 100) == (None, None)


def test_tasks_file(tmp_path):
    path = tmp_path / "tasks.json"
    item = {"id": "a", "context": [5, 6], "continuation": [7]}
    path.write_text(json.dumps({"model": "m", "perplexity": [item]}))
    tasks = peer.load_tasks(path)
    assert tasks["perplexity"] == [item] and tasks["needle"] == [] and tasks["retrieval"] == []
    assert peer.load_tasks(path, ["needle"])["needle"] == []
    path.write_text(json.dumps({"needle": [{"id": "n", "prompt": [1]}]}))
    with pytest.raises(ValueError, match="answer"):
        peer.load_tasks(path)
    path.write_text(json.dumps({"perplexity": [item, item]}))
    with pytest.raises(ValueError, match="unique"):
        peer.load_tasks(path)


def test_row_keys_follow_the_tokens():
    a = {"id": "x", "prompt": [1, 2, 3], "answer": "42", "depth": 0.5}
    b = dict(a, prompt=[1, 2, 4])
    assert peer.item_digest("needle", a) == peer.item_digest("needle", dict(a, depth=0.9))
    assert peer.item_digest("needle", a) != peer.item_digest("needle", b)
    # The token digest (benchmarks/quality.py's, tested there) covers the ids only, and a
    # perplexity window whole: the same ids as one prompt digest alike.
    window = {"context": [1, 2], "continuation": [3]}
    assert peer.tokens_digest("perplexity", window) == peer.tokens_digest("needle", a)
    assert peer.tokens_digest("needle", a) == peer.tokens_digest("needle", dict(a, answer="7"))
    assert peer.tokens_digest("needle", a) != peer.tokens_digest("needle", b)
    key = peer.row_key("tova", 0.25, "needle", "x", "d", "float32")
    assert key == "tova|budget=0.25|needle|x|d|float32"


def test_answer_match():
    # The main harness's rule: the first number, exactly.
    assert peer.exact_match(" 48213.\n\nWhat is 7?", "48213")
    assert not peer.exact_match(" 4821.", "48213")
    assert not peer.exact_match(" 7 or 48213", "48213")
    assert not peer.exact_match(" 482130", "48213")
    assert not peer.exact_match(" none", "48213")
    assert peer.contains_answer(" 7 or 48213", "48213")
    assert not peer.contains_answer(" 4821.", "48213")
    assert peer.answer_tokens("48213", None) == 8 and peer.answer_tokens("48213", 16) == 16


def test_summary_and_table():
    base = {"cache_bytes": 2**20, "full_cache_bytes": 4 * 2**20, "prefill_s": 1.0, "decode_s": 1.0}
    rows = [
        base | {"press": "tova", "budget_fraction": 0.25, "task": "perplexity", "nll": [0.0, 2.0]},
        base | {"press": "tova", "budget_fraction": 0.25, "task": "needle", "correct": True},
        base | {"press": "tova", "budget_fraction": 0.25, "task": "needle", "correct": False},
        base | {"press": "none", "budget_fraction": 1.0, "task": "perplexity", "nll": [1.0]},
    ]
    lines = peer.summarize(rows)
    assert list(zip(lines.press, lines.task, strict=True)) == [
        ("none", "perplexity"),
        ("tova", "perplexity"),
        ("tova", "needle"),
    ]
    assert lines.perplexity[1] == pytest.approx(math.e)
    assert lines.accuracy[2] == 0.5 and list(lines["items"]) == [1, 1, 2]
    assert table_rows(peer.table(lines)) == [
        ["press", "budget", "task", "items", "cache kept", "% of full", "perplexity / accuracy",
         "s / item"],
        ["none", "1", "perplexity", "1", "1.00 MiB", "25.0%", "2.718", "2.0"],
        ["tova", "0.25", "perplexity", "1", "1.00 MiB", "25.0%", "2.718", "2.0"],
        ["tova", "0.25", "needle", "2", "1.00 MiB", "25.0%", "50%", "2.0"],
    ]  # fmt: skip


def test_no_press_reproduces_the_plain_model():
    model = hf_model("llama")
    window = ids(96, seed=1)
    nll, info = peer.continuation_nll(model, window[:80], window[80:])
    ref = reference_nll(model, torch.tensor([window]), 80)
    torch.testing.assert_close(nll, ref, rtol=1e-4, atol=1e-5)
    assert info["cache_slots_prefill"] == 80 and info["cache_slots_end"] == 95
    assert info["cache_bytes_prefill"] == peer.full_kv_bytes(model.config, 80, torch.float32)


@contextlib.contextmanager
def _drop_press(model, lo: int, hi: int):
    """Stand-in for a kvpress prefill press: after each attention layer's prefill, drop [lo, hi)."""

    def hook(module, args, kwargs, output):
        if kwargs["hidden_states"].shape[1] > 1:  # prefill only, as kvpress
            # transformers >= 5.24 passes the cache as `cache`, earlier 5.x as `past_key_values`.
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            layer = cache.layers[module.layer_idx]
            keep = [*range(lo), *range(hi, layer.keys.shape[-2])]
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        return output

    handles = [
        layer.self_attn.register_forward_hook(hook, with_kwargs=True)
        for layer in model.model.layers
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def test_pruned_cache_decodes_at_the_true_positions():
    model = hf_model("llama")
    window, context, lo, hi = ids(100, seed=2), 80, 4, 50
    nll, info = peer.continuation_nll(
        model, window[:context], window[context:], lambda m: _drop_press(m, lo, hi)
    )
    assert info["cache_slots_prefill"] == context - (hi - lo)
    # Reference: one pass where the continuation's queries cannot see the dropped keys (the
    # prefill's own queries saw everything, as with kvpress) and RoPE positions are the text's.
    n = len(window)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[context:, lo:hi] = False
    mask = torch.zeros(1, 1, n, n).masked_fill(~allowed, float("-inf"))
    logits = model(torch.tensor([window]), attention_mask=mask, use_cache=False).logits[0]
    logp = torch.log_softmax(logits[context - 1 : -1].float(), dim=-1)
    ref = -logp.gather(-1, torch.tensor(window[context:])[:, None])[:, 0]
    torch.testing.assert_close(nll, ref, rtol=1e-4, atol=1e-5)
    full, _ = peer.continuation_nll(model, window[:context], window[context:])
    assert not torch.allclose(nll, full)


@torch.no_grad()
def test_greedy_decode_matches_generate():
    model = hf_model("llama")
    prompt = ids(40, seed=3)
    out, info = peer.greedy_decode(model, prompt, max_new_tokens=12, eos={EOS_TOKEN_ID})
    ref = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=EOS_TOKEN_ID
    )[0, len(prompt) :].tolist()
    assert out == ref[: len(out)] and 1 <= len(out) <= 12
    assert info["cache_slots_prefill"] == 40
    # Stopping at an EOS id: make the first greedy token the "EOS".
    first, _ = peer.greedy_decode(model, prompt, max_new_tokens=12, eos={out[0]})
    assert first == out[:1]
