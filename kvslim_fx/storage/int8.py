"""``int8``: K and V rows quantised to int8 with torchao's affine primitives, a scale per group.

Each row (one token's key or value, ``D`` channels) is split into groups of ``group`` channels;
each group is quantised symmetrically (``torchao.quantization.quant_primitives``:
``choose_qparams_affine`` with ``MappingType.SYMMETRIC``, ``quantize_affine``,
``dequantize_affine``). Scales are kept in the model's dtype when it is 16-bit (rounded up, so
the group's largest element still maps inside the int8 range; codes are computed with the
stored scale), else in float32. A row is then ``D`` bytes plus ``2·D/group`` (16-bit) or
``4·D/group`` of scales, where ``dense`` takes ``2·D`` or ``4·D``.

Why per token (row) and not KIVI's per-channel keys: a slot cache writes, merges and evicts rows
one at a time in no particular order; a per-channel scale is shared by a group of tokens, so
writing one token would re-quantise its group (KIVI keeps the newest tokens in full precision
and quantises them in groups as they age, which needs ordered, append-only storage). Groups
along the channels give keys' outlier channels scales of their own instead; the default group
was chosen by measurement (docs/design.md).

Attention reads the codes through ``kvslim::attend_int8``: on CUDA its Triton kernel
dequantises each row as it loads it; elsewhere the reference dequantises the rows, then attends.
Keys kept before RoPE are dequantised and rotated first (the kernel does not rotate). A merge
dequantises the pair, combines it in float32 and re-quantises the result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import KVSlimError
from ..kernels.attention import attend_int8  # noqa: F401  (registers kvslim::attend_int8)
from ..kernels.run_merge import rope_rotate
from ..kernels.slots import gather_slots, slot_index
from ..passes.int8_linear import import_torchao
from .base import Storage, register_storage

# Channels per scale (docs/design.md has the measurement that chose it).
DEFAULT_GROUP = 32


def _torchao():
    """torchao's quantisation primitives."""
    from torchao.quantization import quant_primitives

    return quant_primitives


def quantize(
    x: Tensor, group: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``x [..., D]`` → int8 codes ``[..., D]`` and scales ``[..., D / group]`` in
    ``scale_dtype`` (float32, or a 16-bit type: the scale rounded up to it)."""
    q = _torchao()
    block = (1,) * (x.dim() - 1) + (group,)
    x = x.float()
    scale, zero = q.choose_qparams_affine(x, q.MappingType.SYMMETRIC, block, torch.int8)
    if scale_dtype != torch.float32:
        stored = scale.to(scale_dtype)
        # The next 16-bit float up: scales are positive, so one more in the bit pattern (a
        # bitcast, which Inductor and AOTInductor compile, unlike nextafter).
        up = (stored.view(torch.int16) + 1).view(scale_dtype)
        scale = torch.where(stored.float() < scale, up, stored)
    codes = q.quantize_affine(x, block, scale.float(), zero, torch.int8)
    return codes, scale.reshape(*x.shape[:-1], -1)


def scale_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are kept in for a model in ``dtype``: its own if 16-bit, else float32."""
    return dtype if dtype.itemsize == 2 else torch.float32


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The inverse of :func:`quantize` (up to half a step per element), in ``dtype``."""
    q = _torchao()
    group = codes.shape[-1] // scale.shape[-1]
    block = (1,) * (codes.dim() - 1) + (group,)
    return q.dequantize_affine(codes, block, scale, None, torch.int8, output_dtype=dtype)


@register_storage
class Int8(Storage):
    """``kq, vq [B, H_kv, R, D]`` int8 and ``k_scale, v_scale [B, H_kv, R, D / group]`` in the
    model's dtype if it is 16-bit, else float32."""

    name = "int8"

    def __init__(self, site, rope=None, group: int | None = None, **base) -> None:
        super().__init__(site, rope, **base)
        D = site.head_dim
        if group is None:  # the measured default where it divides the head, else one per row
            group = DEFAULT_GROUP if D % DEFAULT_GROUP == 0 else D
        if isinstance(group, bool) or not isinstance(group, int) or group < 2 or D % group:
            raise KVSlimError(
                f"int8 storage: group={group!r} must be at least 2 and divide the head dimension "
                f"{D} (e.g. group={D} for one scale per row)"
            )
        self.group = group
        # Here, not at the first write: the write may be inside a graph being compiled.
        import_torchao("quantization.quant_primitives")
        for name in ("kq", "vq", "k_scale", "v_scale"):
            self.register_buffer(name, torch.empty(0), persistent=False)
        self.dtype = torch.float32  # the model's, set by allocate: what attention reads

    def options(self) -> dict:
        return {**super().options(), "group": self.group}

    def allocate(self, batch: int, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, self.site.num_kv_heads, rows, self.site.head_dim)
        groups = (*shape[:3], shape[3] // self.group)
        self.dtype = dtype
        scales = scale_dtype_of(dtype)
        if (self.kq.shape != shape or self.kq.device != device
                or self.k_scale.dtype != scales):  # fmt: skip
            self.kq = torch.zeros(shape, dtype=torch.int8, device=device)
            self.vq = torch.zeros_like(self.kq)
            self.k_scale = torch.zeros(groups, dtype=scales, device=device)
            self.v_scale = torch.zeros_like(self.k_scale)
        else:
            for t in (self.kq, self.vq, self.k_scale, self.v_scale):
                t.zero_()

    def keys(self) -> Tensor:
        return dequantize(self.kq, self.k_scale, self.dtype)

    def values(self) -> Tensor:
        return dequantize(self.vq, self.v_scale, self.dtype)

    def attend(self, q, k, v, logc, pos, kv_pos, sink, recent, return_mass):
        if self.rotates_at_read:  # the fused read does not rotate
            return super().attend(q, k, v, logc, pos, kv_pos, sink, recent, return_mass)
        s = self.site
        return torch.ops.kvslim.attend_int8(
            q, k, v, self.kq, self.k_scale, self.vq, self.v_scale, logc, pos, kv_pos, s.scale,
            s.window, sink, recent, return_mass,
        )  # fmt: skip

    def rows(self, slot: Tensor) -> tuple[Tensor, Tensor]:
        return tuple(dequantize(gather_slots(c, slot), gather_slots(s, slot), self.dtype)
                     for c, s in ((self.kq, self.k_scale), (self.vq, self.v_scale)))  # fmt: skip

    def write(self, slot: Tensor, k: Tensor | None, v: Tensor | None, where=None) -> None:
        for x, codes, scale in ((k, self.kq, self.k_scale), (v, self.vq, self.v_scale)):
            if x is None:
                continue
            new_codes, new_scale = quantize(x, self.group, scale.dtype)
            if where is not None:  # rows outside `where` keep their bytes exactly
                new_codes = torch.where(where[..., None], new_codes, gather_slots(codes, slot))
                new_scale = torch.where(where[..., None], new_scale, gather_slots(scale, slot))
            index = slot_index(slot)
            codes.index_put_(index, new_codes)
            scale.index_put_(index, new_scale)

    def move(self, src: Tensor, dst: Tensor) -> None:
        index = slot_index(dst)
        for t in (self.kq, self.vq, self.k_scale, self.v_scale):
            t.index_put_(index, gather_slots(t, src))

    def merge(self, src, dst, do, key, value, gap) -> None:
        (k_src, v_src), (k_dst, v_dst) = self.rows(src), self.rows(dst)
        v = value[0][..., None] * v_src.float() + value[1][..., None] * v_dst.float()
        k = None
        if key is not None:
            rope = self.merge_rope
            k_src = rope_rotate(k_src.float(), gap, None if rope is None else rope.inv_freq,
                                None if rope is None else rope.rotary_dim)  # fmt: skip
            k = key[0][..., None] * k_src + key[1][..., None] * k_dst.float()
        self.write(dst, k, v, where=do)

    def take(self, source: Tensor, keep: Tensor) -> None:
        for name in ("kq", "vq", "k_scale", "v_scale"):
            kept = torch.where(keep[..., None], gather_slots(getattr(self, name), source), 0)
            setattr(self, name, torch.cat([kept, torch.zeros_like(kept[:, :, :1])], dim=2))

    def slot_bytes(self) -> int:
        tensors = (self.kq, self.vq, self.k_scale, self.v_scale)
        return sum(t[:, :, :1].numel() * t.element_size() for t in tensors)
