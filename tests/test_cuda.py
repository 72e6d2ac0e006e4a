"""The transformed model on a CUDA device: its Triton kernels inside a real decode, against the
same model on the CPU, and the decode step as a CUDA graph (``mode="reduce-overhead"``).

Only a CUDA machine runs these (``benchmarks/gpu.sh`` on a lent GPU); elsewhere they skip. The
kernel tests compare each kernel with its reference on drawn shapes; these check what only a
model shows: that every op dispatches to its kernel from a real graph (decode attention with
split keys, the latent read, selection and merges, int8 rows), with the caches the policies
build, and that nothing in the decode step keeps it from being captured.
"""

from __future__ import annotations

import pytest
import torch
from helpers import prompts
from tiny_models import tiny_model

import kvslim_fx

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu.sh on a lent GPU)"
)

CASES = [
    ("full", None, {}),
    ("streaming", 40, {}),
    ("kvslimmer", 48, {"sink": 4, "recent": 4}),
    ("snapkv", 40, {}),
    ("tova", 40, {"storage": "int8"}),
    ("streaming", 40, {"storage": "lorc"}),
    ("full", None, {"storage": "xkv:group=2:rank_k=8:rank_v=8"}),
]


def _teacher_forced(model, ids, mask, tokens) -> torch.Tensor:
    """Logits of the prompt, then of each of ``tokens [B, N]`` fed one at a time (the prompt
    ended in between, as ``generate`` does)."""
    model.reset(batch_size=ids.shape[0], max_length=ids.shape[1] + tokens.shape[1])
    with torch.no_grad():
        logits = [model(ids, mask)]
        model.end_prompt()
        for i in range(tokens.shape[1]):
            step = tokens[:, i : i + 1]
            logits.append(model(step, torch.ones_like(step)))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize(
    ("method", "budget", "options"), CASES, ids=lambda c: c if isinstance(c, str) else None
)
def test_cuda_decode_equals_the_cpu(method, budget, options):
    """The same weights and tokens on both devices: the logits agree within fp32 kernel
    rounding (TF32 off), prompt and 30 decode steps, the cache compressing on the way."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ids, mask = prompts(2, 50, [0, 7], seed=3)
    cpu = kvslim_fx.transform(tiny_model("llama"), method, budget, chunk_size=16, **options)
    tokens = kvslim_fx.generate(cpu, ids, mask, max_new_tokens=30, eos_token_id=[])[:, 50:]
    want = _teacher_forced(cpu, ids, mask, tokens)
    gpu = kvslim_fx.transform(tiny_model("llama").cuda(), method, budget, chunk_size=16,
                              **options)  # fmt: skip
    got = _teacher_forced(gpu, ids.cuda(), mask.cuda(), tokens.cuda())
    torch.testing.assert_close(got.cpu(), want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("method", ["streaming", "kvslimmer"])
def test_the_decode_step_is_one_cuda_graph(method):
    """``torch.compile(mode="reduce-overhead")``: the decode step (static shapes, no host
    sync inside) is captured and replayed, and gives eager's tokens."""
    from torch._dynamo.utils import counters

    model = kvslim_fx.transform(tiny_model("llama").cuda(), method, 48, chunk_size=32)
    ids, mask = (t.cuda() for t in prompts(2, 64, [0, 9], seed=6))
    eager = kvslim_fx.generate(model, ids, mask, max_new_tokens=30, eos_token_id=[])
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    kvslim_fx.generate(compiled, ids, mask, max_new_tokens=2, eos_token_id=[])
    got = kvslim_fx.generate(compiled, ids, mask, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(got, eager)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
