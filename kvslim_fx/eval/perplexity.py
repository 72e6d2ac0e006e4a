"""Quality evaluation: how well a compressed cache still predicts a long text's continuation.

The measure is *continuation perplexity*: prefill ``context`` tokens of a real text, then
teacher-force the next ``continuation`` tokens one at a time, so every continuation token is
predicted from a cache that has been compressed both during prefill and during decoding (as it
is when generating). ``full`` reproduces the original model exactly, so its number is the
reference each method is compared against::

    windows = austen_windows(tokenizer, context=8064, continuation=128, count=2)
    nll = continuation_nll(model, windows[0], context=8064)   # [128]
    print(perplexity(nll))
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..model import KVSlimModel
from .corpus import austen_text


def austen_tokens(tokenizer) -> dict[str, list[int]]:
    """Each Austen novel's token ids by title, tokenized whole (``add_special_tokens=False``)."""
    # verbose=False: a whole novel is far longer than model_max_length, and that is fine.
    return {
        title: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for title, text in austen_text().items()
    }


def austen_windows(
    tokenizer, context: int, continuation: int, count: int, seed: int = 0
) -> list[Tensor]:
    """``count`` token windows ``[1, context + continuation]`` (int64) from Jane Austen's novels.

    Each book is tokenized once, whole, with ``add_special_tokens=False``: no BOS/EOS is added,
    so a window is a plain run of ``context + continuation`` consecutive text tokens that
    usually starts mid-sentence (SmolLM2's tokenizer adds no BOS by default either; the model
    simply attends to the window's first tokens as its sinks). A window never crosses from one
    book into the next, so the text it asks the model to continue is always coherent.

    Windows are spread deterministically: window ``i`` comes from book ``perm[i % books]``
    (``perm`` a seeded permutation of the books long enough to hold a window), and the ``r``-th
    window taken from a book (``r = i // books``) is drawn uniformly from the ``r``-th of
    ``ceil(count / books)`` equal strata of that book's valid start offsets, so repeated draws
    from one book never overlap-cluster. Same arguments (and corpus, tokenizer) → same windows.
    """
    if context < 1 or continuation < 1 or count < 1:
        raise ValueError(
            f"context, continuation and count must be positive, got "
            f"{context}, {continuation}, {count}"
        )
    length = context + continuation
    books = [
        (title, torch.tensor(ids, dtype=torch.long))
        for title, ids in austen_tokens(tokenizer).items()
        if len(ids) >= length
    ]
    if not books:
        raise ValueError(f"no Austen novel has {length} tokens for a window")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(books), generator=g).tolist()
    rounds = math.ceil(count / len(books))
    windows = []
    for i in range(count):
        _, ids = books[perm[i % len(books)]]
        starts = len(ids) - length + 1  # valid start offsets: 0 .. starts - 1
        r = i // len(books)
        lo, hi = starts * r // rounds, max(starts * (r + 1) // rounds, starts * r // rounds + 1)
        start = lo + int(torch.randint(hi - lo, (1,), generator=g))
        windows.append(ids[start : start + length].unsqueeze(0))
    return windows


def austen_passage(tokenizer, length: int, avoid: Sequence[Tensor] = (), ngram: int = 16) -> Tensor:
    """``[1, length]`` consecutive Austen tokens that share no ``ngram``-token run with any of
    ``avoid`` (the windows or prompts being measured): calibration text from the measured
    text's distribution, held out from it. Deterministic: the first such run scanning the
    books from the last backwards, in steps of ``length`` from each book's end."""
    seen = set()
    for ids in avoid:
        flat = ids.reshape(-1).tolist()
        seen.update(tuple(flat[i : i + ngram]) for i in range(len(flat) - ngram + 1))
    for ids in reversed(list(austen_tokens(tokenizer).values())):
        for end in range(len(ids), length - 1, -length):
            run = ids[end - length : end]
            if not any(tuple(run[i : i + ngram]) in seen for i in range(length - ngram + 1)):
                return torch.tensor(run, dtype=torch.long)[None]
    raise ValueError(f"no {length}-token Austen passage avoids the given text")


@torch.no_grad()
def continuation_nll(
    model: KVSlimModel | nn.Module,
    window: Tensor,
    context: int,
    timings: dict[str, float] | None = None,
    diagnostics: dict[str, list] | None = None,
) -> Tensor:
    """Per-token negative log-likelihood ``[N - context]`` (float32) of ``window [1, N]``'s tail.

    The cache is reset for ``N`` tokens (``prompt_len=context`` resolves fractional budgets),
    the first ``context`` tokens are prefilled, and the continuation is teacher-forced **one
    token per call**, so a compressing method compresses at decode time exactly as in
    generation. Token ``context + j`` is predicted by the logits of token ``context + j - 1``
    (the first one by the last prefill logit); the last token is never fed.

    ``timings``, if given, receives ``prefill_s`` and ``decode_s`` (wall seconds);
    ``diagnostics`` receives the model's per-layer ``diagnostics()`` after the prompt
    (``"prompt"``) and at the end (``"end"``), where the model has them.
    """
    if window.dim() != 2 or window.shape[0] != 1:
        raise ValueError(f"window must be [1, N], got {tuple(window.shape)}")
    N = window.shape[1]
    if not 0 < context < N:
        raise ValueError(f"context must lie in [1, {N - 1}] for a window of {N}, got {context}")
    window = window.to(model.device)
    model.reset(batch_size=1, max_length=N, prompt_len=context)

    start = time.perf_counter()
    # Prefill in the model's own chunks (model.forward would split the same way; chunk_size is
    # only final after reset): one call with the whole context would concatenate its logits,
    # [context, vocab] fp32 = 1.6 GB at 8064 x 49152, when only the last row is needed.
    step = model.chunk_size
    for begin in range(0, context, step):
        last = model(window[:, begin : min(begin + step, context)])[:, -1]
    getattr(model, "_orig_mod", model).end_prompt()
    prefill_s = time.perf_counter() - start
    report = getattr(model, "diagnostics", None) if diagnostics is not None else None
    if report is not None:
        diagnostics["prompt"] = report()

    start = time.perf_counter()
    nll = []
    for t in range(context, N):
        # float32 log_softmax: a bf16 model's logits would lose the NLL's small differences.
        logp = torch.log_softmax(last.float(), dim=-1)  # [1, V]
        nll.append(-logp[0, window[0, t]])
        if t + 1 < N:
            last = model(window[:, t : t + 1])[:, -1]
    decode_s = time.perf_counter() - start
    if report is not None:
        diagnostics["end"] = report()
    if timings is not None:
        timings["prefill_s"] = prefill_s
        timings["decode_s"] = decode_s
    return torch.stack(nll).cpu()


@torch.no_grad()
def reference_nll(hf_model: nn.Module, window: Tensor, context: int) -> Tensor:
    """The same ``[N - context]`` NLL from the original HF model in one forward pass (no cache).

    What ``continuation_nll`` of a ``full`` cache must reproduce.
    """
    window = window.to(next(hf_model.parameters()).device)
    logits = hf_model(window, use_cache=False).logits[0, context - 1 : -1].float()  # [M, V]
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, window[0, context:, None])[:, 0].cpu()


def perplexity(nll: Tensor) -> float:
    """``exp(mean NLL)`` of a ``[M]`` tensor of per-token NLLs (nats)."""
    return math.exp(float(nll.double().mean()))
