"""One attention layer's fixed-capacity slot cache: the module the SDPA pass swaps in.

State per layer (buffers, mutated in place so ``torch.compile`` and AOTInductor carry them):

* ``k``, ``v``: ``[B, H_kv, C + 1, D]`` post-RoPE keys and mean values, in the model's dtype;
* ``logc``: ``[B, H_kv, C + 1]`` float32 log cardinality (0 for a slot holding one token);
* ``pos``: ``[B, H_kv, C + 1]`` int64 position of each slot's (last) token, ``-1`` = empty.

The extra last slot is a trash slot: padding and tokens superseded within their own chunk are
written there with position ``-1``, which keeps every write a static-shape scatter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .kernels import attention  # noqa: F401  (registers kvslim::attend)
from .methods import Method, SlotLayout
from .passes.sdpa import AttentionSite


class LayerCache(nn.Module):
    """Cached attention for one layer: attend over slots ∪ new tokens, then write the new tokens."""

    def __init__(self, site: AttentionSite, method: Method) -> None:
        super().__init__()
        self.site = site
        self.method = method
        self.layout: SlotLayout | None = None
        for name, dtype in (("k", None), ("v", None), ("logc", torch.float32), ("pos", torch.long)):
            self.register_buffer(name, torch.empty(0, dtype=dtype), persistent=False)

    @property
    def capacity(self) -> int:
        return 0 if self.layout is None else self.layout.capacity

    def allocate(self, batch: int, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        """Empty the cache, re-allocating only if its shape, dtype or device changes."""
        self.layout = self.method.layout(slots, self.site.window)
        s = self.site
        shape = (batch, s.num_kv_heads, self.layout.capacity + 1)
        if self.pos.shape != shape or self.k.dtype != dtype or self.k.device != device:
            self.k = torch.zeros(*shape, s.head_dim, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
            self.logc = torch.zeros(shape, dtype=torch.float32, device=device)
            self.pos = torch.empty(shape, dtype=torch.long, device=device)
        self.logc.zero_()
        self.pos.fill_(-1)

    def nbytes(self) -> int:
        """Bytes of the ``capacity`` slots (K, V and per-slot metadata; the trash slot excluded)."""
        tensors = (self.k, self.v, self.logc, self.pos)
        per_slot = sum(t[:, :, :1].numel() * t.element_size() for t in tensors)
        return per_slot * self.capacity

    def forward(self, q: Tensor, k: Tensor, v: Tensor, kv_pos: Tensor) -> Tensor:
        """``q [B, H_q, L, D]``, ``k, v [B, H_kv, L, D]``, ``kv_pos [B, L]`` → ``[B, H_q, L, D]``"""
        lay = self.layout
        out, _ = torch.ops.kvslim.attend(
            q, k, v, self.k, self.v, self.logc, self.pos, kv_pos,
            self.site.scale, self.site.window, lay.sink, lay.recent, False,
        )  # fmt: skip
        self._write(k, v, kv_pos)
        return out

    def _write(self, k: Tensor, v: Tensor, kv_pos: Tensor) -> None:
        lay = self.layout
        trash = lay.capacity
        r = kv_pos
        slot = torch.where(r < lay.sink, r, lay.sink + (r - lay.sink) % lay.ring)
        # A token whose ring slot is taken again later in the same chunk is never stored.
        last = r.amax(dim=1, keepdim=True)
        dropped = (r < 0) | ((r >= lay.sink) & (r + lay.ring <= last))
        slot = torch.where(dropped, trash, slot)
        pos = torch.where(dropped, -1, r)
        B, H, L, _ = k.shape
        rows = torch.arange(B, device=k.device)[:, None, None]
        heads = torch.arange(H, device=k.device)[None, :, None]
        index = (rows, heads, slot[:, None, :])
        self.k.index_put_(index, k.to(self.k.dtype))
        self.v.index_put_(index, v.to(self.v.dtype))
        self.pos.index_put_(index, pos[:, None, :].expand(B, H, L))
        self.logc.index_put_(index, torch.zeros((), dtype=self.logc.dtype, device=k.device))
