"""Continuation perplexity: `full` equals one HF forward pass; Austen windows are deterministic."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import hf_model, kv_model
from tiny_models import VOCAB_SIZE

from kvslim_fx.eval.perplexity import austen_windows, continuation_nll, perplexity, reference_nll


def synthetic_window(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (1, n), generator=g)


@pytest.mark.parametrize("context", [64, 70, 150])
def test_full_matches_one_hf_forward(context):
    # 70 and 150: the prefill ends mid-chunk (chunk_size 64), then 26 single-token decode steps.
    window = synthetic_window(context + 26, seed=context)
    timings = {}
    nll = continuation_nll(kv_model("llama"), window, context, timings=timings)
    ref = reference_nll(hf_model("llama"), window, context)
    assert nll.shape == ref.shape == (26,)
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, ref, rtol=1e-4, atol=1e-5)
    assert abs(perplexity(nll) / perplexity(ref) - 1) < 1e-4
    assert timings["prefill_s"] >= 0 and timings["decode_s"] >= 0


def test_compressing_methods_compress_while_decoding():
    window = synthetic_window(112, seed=1)
    full = continuation_nll(kv_model("llama"), window, 96)
    stream = continuation_nll(kv_model("llama", "streaming", 48), window, 96)
    model = kv_model("llama", "kvslimmer", 72)
    slim = continuation_nll(model, window, 96)
    for nll in (stream, slim):
        assert nll.shape == (16,) and torch.isfinite(nll).all()
        assert not torch.allclose(nll, full)
    for layer in model.layers:
        # 111 tokens fed (the last one is never fed) and all kept, merged into the 72 slots;
        # each of the 15 decode steps had to merge once.
        assert int((layer.pos[0, :, :72] >= 0).sum()) == 72 * layer.pos.shape[1]
        assert int(torch.exp(layer.logc[0, :, :72]).sum().round()) == 111 * layer.pos.shape[1]
        assert float(layer.merge_stats[0]) >= 15


def test_perplexity_is_exp_mean():
    assert perplexity(torch.tensor([0.0, 2.0])) == pytest.approx(math.e)


def test_bad_windows_are_refused():
    model = kv_model("llama")
    with pytest.raises(ValueError, match=r"\[1, N\]"):
        continuation_nll(model, synthetic_window(10).expand(2, -1), 5)
    with pytest.raises(ValueError, match="context"):
        continuation_nll(model, synthetic_window(10), 10)


class CharTokenizer:
    """One token per character: makes window contents easy to check against the text."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        assert not add_special_tokens
        return {"input_ids": [ord(c) for c in text]}


@pytest.fixture
def fake_corpus(monkeypatch):
    books = {
        "A": "".join(chr(65 + i % 26) for i in range(500)),
        "B": "".join(chr(97 + i % 26) for i in range(300)),
        "Short": "xyz" * 10,  # 30 tokens: too short for any window below
        "C": "".join(chr(0x400 + i % 50) for i in range(400)),
    }
    monkeypatch.setattr("kvslim_fx.eval.perplexity.austen_text", lambda: dict(books))
    return books


def test_austen_windows_are_deterministic_slices(fake_corpus):
    tok = CharTokenizer()
    windows = austen_windows(tok, context=40, continuation=8, count=7, seed=3)
    again = austen_windows(tok, context=40, continuation=8, count=7, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))
    texts = {title: [ord(c) for c in text] for title, text in fake_corpus.items()}
    sources = []
    for w in windows:
        assert w.shape == (1, 48) and w.dtype == torch.long
        ids = w[0].tolist()
        hits = [
            (title, s)
            for title, t in texts.items()
            for s in range(len(t) - 47)
            if t[s : s + 48] == ids
        ]
        assert hits, "a window is not a contiguous slice of one book"
        sources.append(hits[0])
    titles = [t for t, _ in sources]
    # 7 windows over the 3 books long enough: round-robin, no window from the short book.
    assert "Short" not in titles
    assert sorted(set(titles[:3])) == ["A", "B", "C"]
    assert titles[:3] == titles[3:6] and titles[6] == titles[0]
    # Windows from the same book come from different strata of its offsets: distinct starts.
    assert len(set(sources)) == len(sources)
    other = austen_windows(tok, context=40, continuation=8, count=7, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(windows, other, strict=True))


def test_austen_windows_refuse_impossible_lengths(fake_corpus):
    with pytest.raises(ValueError, match="no Austen novel"):
        austen_windows(CharTokenizer(), context=600, continuation=8, count=1)
    with pytest.raises(ValueError, match="positive"):
        austen_windows(CharTokenizer(), context=0, continuation=8, count=1)
