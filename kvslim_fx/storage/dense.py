"""``dense``: K and V rows as they are, in the model's dtype."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.pair_merge import merge_rows  # noqa: F401  (registers kvslim::merge_rows)
from ..kernels.slots import put_slots, slot_index
from .base import Storage, register_storage


@register_storage
class Dense(Storage):
    """``k``, ``v``: ``[B, H_kv, R, D]`` buffers; attention reads them in place."""

    name = "dense"

    def __init__(self, site, rope=None, **base) -> None:
        super().__init__(site, rope, **base)
        self.register_buffer("k", torch.empty(0), persistent=False)
        self.register_buffer("v", torch.empty(0), persistent=False)

    def allocate(self, batch: int, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, self.site.num_kv_heads, rows, self.site.head_dim)
        if self.k.shape != shape or self.k.dtype != dtype or self.k.device != device:
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
        else:
            self.k.zero_()
            self.v.zero_()

    def keys(self) -> Tensor:
        return self.k

    def values(self) -> Tensor:
        return self.v

    def write(self, slot: Tensor, k: Tensor | None, v: Tensor | None) -> None:
        # index_put_ stays in place under Inductor; a scatter_ copies the whole buffer.
        if k is not None:
            self.k.index_put_(slot_index(slot), k.to(self.k.dtype))
        if v is not None:
            self.v.index_put_(slot_index(slot), v.to(self.v.dtype))

    def merge(self, src, dst, do, key, value, gap) -> None:
        rope = self.merge_rope
        k, v = torch.ops.kvslim.merge_rows(
            self.k, self.v, src, dst, *(key or (None, None)), *value, gap,
            None if rope is None else rope.inv_freq.to(self.k.device),
            0 if rope is None else rope.rotary_dim,
        )  # fmt: skip
        if key is not None:
            put_slots(self.k, dst, k, do)
        put_slots(self.v, dst, v, do)

    def take(self, source: Tensor, keep: Tensor) -> None:
        idx = source[..., None].expand(*source.shape, self.site.head_dim)
        for name in ("k", "v"):
            old = getattr(self, name)
            kept = torch.where(keep[..., None], old.gather(2, idx), 0)
            setattr(self, name, torch.cat([kept, torch.zeros_like(kept[:, :, :1])], dim=2))

    def slot_bytes(self) -> int:
        return sum(t[:, :, :1].numel() * t.element_size() for t in (self.k, self.v))
