"""Int8 weights (``transform(..., weights="int8")`` or a model torchao already quantized).

The definition: every linear computes ``x @ (codes · scale)ᵀ + b`` with torchao's per-row
symmetric int8 codes. So a model quantized by ``torchao.quantization.quantize_`` and transformed
must give the logits of the same model transformed with ``weights="int8"``, bit for bit, and
stay within int8's rounding of the float model; the user's model keeps its weights.
"""

from __future__ import annotations

import pytest
import torch
from helpers import hf_model, kv_model, prompts, transform_reusing_trace
from hypothesis import given, settings
from hypothesis import strategies as st
from kvslim_fx.passes.int8_linear import GEMV_ROWS, linear_int8, quantize_rows
from tiny_models import tiny_model
from torch._inductor.utils import run_and_get_code

import kvslim_fx
from kvslim_fx import KVSlimError


def dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype) * scale[:, None]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    n=st.integers(1, 40),
    k=st.integers(2, 40),  # torchao cannot quantize a one-column weight per row
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantized_rows_rebuild_the_weight_and_the_linear_uses_them(rows, n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    codes, scale = quantize_rows(w)
    assert codes.dtype == torch.int8 and codes.shape == (n, k) and scale.shape == (n,)
    # Symmetric per row: a step of max|w| / 127.5, and no entry rounded by more than half one.
    torch.testing.assert_close(scale, w.abs().amax(1) / 127.5)
    assert ((dequantized(codes, scale) - w).abs() <= scale[:, None] * (0.5 + 1e-3)).all()
    x = torch.randn(rows, 3, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    want = torch.nn.functional.linear(x, dequantized(codes, scale), b)
    torch.testing.assert_close(linear_int8(x, codes, scale, b), want, rtol=1e-5, atol=1e-5)


def test_a_compiled_decode_step_reads_the_codes_in_one_reduction():
    # The reduction (few rows) and the matmul (a chunk) against the definition, compiled.
    g = torch.Generator().manual_seed(0)
    codes, scale = quantize_rows(torch.randn(48, 40, generator=g))
    compiled = torch.compile(linear_int8, fullgraph=True, dynamic=False)
    for rows in (1, GEMV_ROWS, GEMV_ROWS + 1, 64):
        x = torch.randn(rows, 40, generator=g)
        want = x @ dequantized(codes, scale).T
        got, (code,) = run_and_get_code(compiled, x, codes, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # No float copy of the weight for a matmul: the kernel reads the int8 codes.
        assert ("extern_kernels.mm" in code) == (rows > GEMV_ROWS)


def test_int8_weights_are_torchaos_quantization_and_leave_the_model_alone():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    hf = hf_model("qwen2")  # biases on q/k/v: they stay floats beside the int8 codes
    before = {n: p.clone() for n, p in hf.named_parameters()}
    ours = transform_reusing_trace(hf, weights="int8")
    assert all(torch.equal(p, before[n]) for n, p in hf.named_parameters())
    assert all(type(p) is torch.nn.Parameter for p in hf.parameters())
    theirs_hf = tiny_model("qwen2")
    quantize_(theirs_hf, Int8WeightOnlyConfig(set_inductor_config=False))
    theirs = kvslim_fx.transform(theirs_hf)
    linears = sum(isinstance(m, torch.nn.Linear) for m in hf.modules())
    codes = [n for n, b in ours.graph.named_buffers() if n.endswith("weight_codes")]
    assert len(codes) == linears
    assert sorted(codes) == sorted(n for n, _ in theirs.graph.named_buffers()
                                   if n.endswith("weight_codes"))  # fmt: skip
    # torchao's model was put back as it was after the trace.
    assert type(theirs_hf.lm_head.weight).__name__ == "Int8Tensor"
    ids, mask = prompts(2, 24, [0, 5], seed=3)
    with torch.no_grad():
        a, b = ours(ids, mask), theirs(ids, mask)
        ours.reset()
        floats = transform_reusing_trace(hf)(ids, mask)
    assert torch.equal(a, b)
    # int8 rounding of every weight moves the logits a little, not a lot.
    rms = (a - floats)[mask.bool()].pow(2).mean().sqrt()
    assert 0 < rms < 0.02 * floats[mask.bool()].std()


def test_lorc_factors_the_int8_weights_the_model_runs_with():
    # At full rank LoRC's latents rebuild the keys and values exactly: so it must have factored
    # the dequantized int8 projections, not the float ones the user's model still holds.
    dense = kv_model("llama", "full", weights="int8")
    lorc = kv_model("llama", "full", weights="int8", storage="lorc:ratio=1.0")
    ids, mask = prompts(2, 40, [0, 7], seed=4)
    with torch.no_grad():
        want, got = dense(ids, mask), lorc(ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cache_bytes_do_not_depend_on_the_weights():
    a = kv_model("llama", "streaming", 40)
    b = kv_model("llama", "streaming", 40, weights="int8")
    for m in (a, b):
        m.reset(batch_size=2, max_length=100)
    assert a.cache_bytes() == b.cache_bytes()


@pytest.mark.parametrize("weights", ["int4", "fp8", None])
def test_unknown_weights_are_refused(weights):
    with pytest.raises(KVSlimError, match="weights must be one of model, int8"):
        kvslim_fx.transform(hf_model("llama"), weights=weights)
