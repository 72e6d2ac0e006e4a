"""Storages: ``int8`` against its definition (dense rows, quantised on every write).

``FakeQuant`` below is that definition: the dense storage, each written or merged row replaced
by ``dequantize(quantize(row))``. Under every policy, int8 must give the same logits bit for
bit, so it can only differ from dense by the rounding of its writes; and its bytes must be what
the acceptance asks (≤ 0.55 × dense).
"""

from __future__ import annotations

import torch
from helpers import transform_reusing_trace
from hypothesis import given, settings
from hypothesis import strategies as st
from kvslim_fx.passes.rope import RopeFacts
from kvslim_fx.passes.sdpa import AttentionSite
from test_properties import cases, hf_model, run, tokens

from kvslim_fx.storage import STORAGES, Dense, Int8, register_storage
from kvslim_fx.storage.int8 import dequantize, quantize, scale_dtype_of

POLICIES = ("full", "streaming", "kvslimmer", "weightedkv", "h2o", "tova", "snapkv")


def fake_quant(x: torch.Tensor, group: int) -> torch.Tensor:
    """int8's round trip of rows in the model's dtype (16-bit scales for a 16-bit model)."""
    return dequantize(*quantize(x, group, scale_dtype_of(x.dtype)), x.dtype)


if "fake-int8" not in STORAGES:

    @register_storage
    class FakeQuant(Dense):
        """Dense rows that hold ``dequantize(quantize(row))``: int8's definition."""

        name = "fake-int8"

        def __init__(self, site, rope=None, group: int | None = None, **base) -> None:
            super().__init__(site, rope, **base)
            self.group = Int8(site, rope, group=group).group

        def write(self, slot, k, v):
            super().write(slot, *(None if x is None else fake_quant(x, self.group)
                                  for x in (k, v)))  # fmt: skip

        def move(self, src, dst):  # a copy, as stored
            Dense.write(self, dst, *self.rows(src))

        def merge(self, src, dst, do, key, value, gap):
            super().merge(src, dst, do, key, value, gap)
            keep = do[..., None]  # merged rows are quantised again; the others were already
            k, v = (torch.where(keep, fake_quant(x, self.group), x) for x in self.rows(dst))
            Dense.write(self, dst, None if key is None else k, v)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9)),
    groups=st.integers(1, 4),
    group=st.sampled_from([2, 4, 16, 32]),
    outliers=st.booleans(),
    scale_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dequantise_of_quantise_is_within_half_a_step(
    shape, groups, group, outliers, scale_dtype, seed
):
    """Half a step of the stored scale, which a 16-bit model keeps in its own dtype."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 10 ** torch.empty(1).uniform_(-4, 3, generator=g)
    x = torch.randn(*shape, groups * group, generator=g) * magnitude
    if outliers:  # a few channels 100× the rest, as keys have
        x[..., :: max(1, group // 2)] *= 100
    codes, scale = quantize(x, group, scale_dtype)
    assert codes.dtype == torch.int8 and scale.shape == (*shape, groups)
    assert scale.dtype == scale_dtype
    step = scale.float().repeat_interleave(group, dim=-1)
    error = (dequantize(codes, scale, torch.float32) - x).abs()
    # Half a step, up to float32's own rounding of the product code · scale.
    assert bool((error <= step / 2 + 4 * torch.finfo(torch.float32).eps * x.abs()).all())


@settings(max_examples=40, deadline=None)
@given(case=cases(POLICIES, "accepted", max_length=120, max_steps=8), pre_rope=st.booleans())
def test_int8_is_dense_with_quantised_writes_under_every_policy(case, pre_rope):
    """Keys after RoPE or before it (then quantised un-rotated)."""
    hf = hf_model(case["arch"])
    models = [
        transform_reusing_trace(hf, case["name"], case["budget"], chunk_size=case["chunk"],
                                storage=f"{storage}:pre_rope={pre_rope}", **case["options"])
        for storage in ("int8", "fake-int8")
    ]  # fmt: skip
    ids, mask = tokens(case)
    got, want = (run(m, case, ids, mask) for m in models)
    assert torch.equal(got, want)
    for mine, ref in zip(models[0].layers, models[1].layers, strict=True):
        assert torch.equal(mine.pos, ref.pos)
        # Occupied rows only: several pads or dropped tokens may be written to the trash row in
        # one step, and which of them stays there is up to index_put_ (nothing reads it).
        held = mine.pos >= 0
        assert torch.equal(mine.storage.keys()[held], ref.storage.keys()[held])
        assert torch.equal(mine.storage.values()[held], ref.storage.values()[held])


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), C=st.integers(2, 12), P=st.integers(1, 3),
    keys=st.booleans(), rope=st.booleans(), seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_an_int8_merge_is_the_dense_merge_requantised(B, H, C, P, keys, rope, seed):
    D, P = 16, min(P, C // 2)
    site = AttentionSite(layer=0, num_q_heads=H, num_kv_heads=H, head_dim=D, scale=0.25, window=0)
    facts = RopeFacts(10000 ** -(torch.arange(D // 2) * 2 / D), D) if rope else None
    int8, fake = Int8(site, facts, group=8), STORAGES["fake-int8"](site, facts, group=8)
    g = torch.Generator().manual_seed(seed)
    for s in (int8, fake):
        s.allocate(B, C + 1, torch.float32, torch.device("cpu"))
    slots = torch.arange(C + 1).expand(B, H, C + 1)
    k, v = torch.randn(B, H, C + 1, D, generator=g), torch.randn(B, H, C + 1, D, generator=g)
    for s in (int8, fake):
        s.write(slots, k, v)
    pairs = torch.stack([torch.randperm(C, generator=g)[: 2 * P] for _ in range(B * H)])
    src, dst = pairs.view(B, H, P, 2).unbind(-1)
    do = torch.rand(B, H, P, generator=g) < 0.7
    weights = [torch.rand(B, H, P, generator=g) for _ in range(4)]
    gap = torch.randint(0, 40, (B, H, P), generator=g)
    key = (weights[0], weights[1]) if keys else None
    before = (int8.kq.clone(), int8.vq.clone())
    for s in (int8, fake):
        s.merge(src, dst, do, key, (weights[2], weights[3]), gap)
    assert torch.equal(int8.keys(), fake.keys()) and torch.equal(int8.values(), fake.values())
    touched = torch.zeros(B, H, C + 1, dtype=torch.bool).scatter_(2, dst, do)
    assert torch.equal(int8.kq[~touched], before[0][~touched])  # other rows keep their bytes
    assert torch.equal(int8.vq[~touched], before[1][~touched])


def test_int8_bytes_are_at_most_055_of_dense():
    """Every policy over float32 (the default model's dtype): codes, scales and the slot
    bookkeeping all counted. A slot of one KV head costs ``2·D`` bytes of codes and ``2·4·D/g``
    of scales (tiny llama: ``D = 16``, one scale per row) against ``2·4·D``."""
    B, H, D = 2, 2, 16
    for name, budget, options in (("full", None, {}), ("streaming", 32, {}),
                                  ("kvslimmer", 40, {"sink": 4, "recent": 4}),
                                  ("weightedkv", 32, {}), ("h2o", 32, {}), ("tova", 32, {}),
                                  ("snapkv", 40, {})):  # fmt: skip
        sizes = {}
        for storage in ("dense", "int8"):
            model = transform_reusing_trace(hf_model("llama"), name, budget, storage=storage,
                                            **options)  # fmt: skip
            model.reset(batch_size=B, max_length=64)
            sizes[storage] = model.cache_bytes()
            layer = model.layers[0]
            rows = {"dense": 2 * 4 * D, "int8": 2 * D + 2 * 4}[storage]
            assert layer.storage.slot_bytes() == B * H * rows
        assert sizes["int8"] <= 0.55 * sizes["dense"], (name, sizes)


def test_a_16_bit_model_keeps_16_bit_scales():
    """``2·D`` bytes of codes and ``2·2·D/g`` of scales against ``2·2·D``: at ``D = 128`` and
    ``g = 32`` (most 16-bit models) 0.53× before the slot bookkeeping; tiny llama's ``D = 16``
    has one scale per row."""
    site = AttentionSite(layer=0, num_q_heads=4, num_kv_heads=2, head_dim=16, scale=0.25,
                         window=0)  # fmt: skip
    for dtype, scale_bytes in ((torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)):
        int8 = Int8(site)
        int8.allocate(3, 9, dtype, torch.device("cpu"))
        assert int8.k_scale.dtype == (dtype if scale_bytes == 2 else torch.float32)
        assert int8.slot_bytes() == 3 * 2 * (2 * 16 + 2 * scale_bytes)
        rows = torch.randn(3, 2, 4, 16).to(dtype)
        slots = torch.arange(4).expand(3, 2, 4)
        int8.write(slots, rows, rows)
        step = int8.k_scale[:, :, :4].float()  # one group per row
        assert bool(((int8.keys()[:, :, :4].float() - rows.float()).abs() <= step).all())
