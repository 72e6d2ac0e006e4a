"""One attention layer's fixed-capacity slot cache: the module the SDPA pass swaps in.

State per layer (buffers, mutated in place so ``torch.compile`` and AOTInductor carry them):

* ``k``, ``v``: ``[B, H_kv, C + 1, D]`` post-RoPE keys and mean values, in the model's dtype;
* ``logc``: ``[B, H_kv, C + 1]`` float32 log cardinality (0 for a slot holding one token);
* ``pos``: ``[B, H_kv, C + 1]`` int64 position of each slot's (last) token, ``-1`` = empty;
* whatever per-slot state the method declares (``[B, H_kv, C + 1]`` each), and
  ``merge_stats [4]`` (float64) for the methods that store tokens themselves: tokens merged
  or dropped, fallbacks (KVSlimmer's closed form, WeightedKV's fold weights), the most tokens
  one step merged or dropped in one row and KV head, and the most slots one merge joined.

The extra last slot is a trash slot: padding and tokens superseded within their own chunk are
written there with position ``-1``, which keeps every write a static-shape ``index_put_``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .kernels.attention import window_mass  # (importing it registers kvslim::attend)
from .methods import Method, SlotLayout
from .passes.rope import RopeFacts
from .passes.sdpa import AttentionSite

_BASE_STATE = {"logc": (torch.float32, 0.0), "pos": (torch.long, -1)}


class LayerCache(nn.Module):
    """Cached attention for one layer: attend over slots ∪ new tokens, then store the new tokens."""

    def __init__(self, site: AttentionSite, method: Method, rope: RopeFacts | None = None) -> None:
        super().__init__()
        self.site = site
        self.method = method
        self.rope = rope
        self.layout: SlotLayout | None = None
        self.slot_state = {**_BASE_STATE, **method.slot_state()}
        for name in ("k", "v", "merge_stats", *self.slot_state):
            self.register_buffer(name, torch.empty(0), persistent=False)
        # The prompt's last queries [B, H_q, W, D] and their positions [B, W], kept while a
        # question-aware prefill fills the cache (plain tensors: not part of the decode state).
        self.window_q: Tensor | None = None
        self.window_pos: Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.layout is None else self.layout.capacity

    def allocate(
        self,
        batch: int,
        slots: int,
        dtype: torch.dtype,
        device: torch.device,
        observe: int = 0,
    ) -> None:
        """Empty the cache, re-allocating only if its shape, dtype or device changes.

        ``observe > 0``: keep the last ``observe`` queries for :meth:`end_prompt`.
        """
        self.layout = self.method.layout(slots, self.site.window)
        if observe:
            s = self.site
            self.window_q = torch.zeros(batch, s.num_q_heads, observe, s.head_dim, dtype=dtype,
                                        device=device)  # fmt: skip
            self.window_pos = torch.full((batch, observe), -1, dtype=torch.long, device=device)
        else:
            self.window_q = self.window_pos = None
        s = self.site
        shape = (batch, s.num_kv_heads, self.layout.capacity + 1)
        if self.pos.shape != shape or self.k.dtype != dtype or self.k.device != device:
            self.k = torch.zeros(*shape, s.head_dim, dtype=dtype, device=device)
            self.v = torch.zeros_like(self.k)
            for name, (state_dtype, _) in self.slot_state.items():
                setattr(self, name, torch.empty(shape, dtype=state_dtype, device=device))
            self.merge_stats = torch.zeros(4, dtype=torch.float64, device=device)
        for name, (_, fill) in self.slot_state.items():
            getattr(self, name).fill_(fill)
        self.merge_stats.zero_()

    def record_event(self, count: Tensor, joined: Tensor | int = 0) -> None:
        """Keep the largest ``count [B, H]`` of tokens one step merged or dropped, and the
        largest number of slots one merge ``joined`` (``merge_stats[2:]``)."""
        most = torch.stack([count.max().double(), torch.as_tensor(joined).max().double()])
        self.merge_stats[2:] = torch.maximum(self.merge_stats[2:], most)

    def diagnostics(self) -> dict[str, float]:
        """What would reveal a degenerate regime: occupancy, the largest slots, merge counts.

        ``occupied``: the most slots in use in one row and KV head; ``largest_slot`` and
        ``p99_slot``: the largest cardinality (tokens in one slot) and its 99th percentile over
        the occupied slots; ``merged``, ``fallbacks``, ``most_per_step``, ``most_joined``: as
        ``merge_stats``.
        """
        C = self.capacity
        occupied = self.pos[:, :, :C] >= 0
        cards = self.logc[:, :, :C].exp()[occupied].double()
        stats = self.merge_stats.tolist()
        return {
            "occupied": int(occupied.sum(-1).max()) if C else 0,
            "largest_slot": float(cards.max()) if cards.numel() else 0.0,
            "p99_slot": float(cards.quantile(0.99)) if cards.numel() else 0.0,
            "merged": stats[0],
            "fallbacks": stats[1],
            "most_per_step": stats[2],
            "most_joined": stats[3],
        }

    def nbytes(self) -> int:
        """Bytes of the ``capacity`` slots (K, V and per-slot state; the trash slot excluded)."""
        tensors = [self.k, self.v, *(getattr(self, n) for n in self.slot_state)]
        per_slot = sum(t[:, :, :1].numel() * t.element_size() for t in tensors)
        return per_slot * self.capacity

    def forward(self, q: Tensor, k: Tensor, v: Tensor, kv_pos: Tensor) -> Tensor:
        """``q [B, H_q, L, D]``, ``k, v [B, H_kv, L, D]``, ``kv_pos [B, L]`` → ``[B, H_q, L, D]``"""
        lay = self.layout
        if self.window_q is not None:
            W = self.window_q.shape[2]
            self.window_q.copy_(torch.cat([self.window_q, q], dim=2)[:, :, -W:])
            self.window_pos.copy_(torch.cat([self.window_pos, kv_pos], dim=1)[:, -W:])
        out, mass = torch.ops.kvslim.attend(
            q, k, v, self.k, self.v, self.method.attention_logc(self.logc), self.pos, kv_pos,
            self.site.scale, self.site.window, lay.sink, lay.recent, lay.merges,
        )  # fmt: skip
        if lay.merges:
            self.method.update(self, k, v, kv_pos, mass)
        else:
            self.write_ring(k, v, kv_pos)
        return out

    def window_mass(self) -> tuple[Tensor, Tensor]:
        """The attention of the prompt's last queries (those the layer keeps: the method's
        ``observe``, at most the model's ``prefill_window``) over the cache: ``mass`` and ``seen``
        ``[B, H_kv, C]`` (:func:`~kvslim_fx.kernels.attention.window_mass`)."""
        C = self.capacity
        return window_mass(
            self.window_q, self.window_pos, self.k[:, :, :C],
            self.method.attention_logc(self.logc[:, :, :C]), self.pos[:, :, :C],
            self.site.scale, self.site.window,
        )  # fmt: skip

    def end_prompt(self, slots: int) -> None:
        """Compress a cache that holds the whole prompt to ``slots`` per layer, once, scored by
        the prompt's last queries; then hold ``slots`` (the method's layout for them) from here.
        """
        self.method.compress_prompt(self, slots)
        self.window_q = self.window_pos = None
        layout = self.method.layout(slots, self.site.window)
        if layout != self.layout:
            self._compact(layout)

    def _compact(self, layout: SlotLayout) -> None:
        """Move the kept slots into buffers of ``layout``'s capacity (positions unchanged).

        A ring layout places a token by its position (the ring overwrite keeps the newest, which
        is StreamingLLM's eviction); a merging layout takes the occupied slots in position order.
        """
        C, N = self.capacity, layout.capacity
        pos = self.pos[:, :, :C]
        if layout.merges:
            order = torch.where(pos >= 0, pos, torch.iinfo(pos.dtype).max).argsort(dim=-1)
            source = order[..., :N]
            keep = pos.gather(2, source) >= 0
        else:
            # A ring keeps its sinks and the newest `ring` tokens (StreamingLLM's eviction), each
            # in the slot its position maps to.
            sink, ring = layout.sink, layout.ring
            newest = pos.amax(dim=-1, keepdim=True)
            stays = (pos >= 0) & ((pos < sink) | (pos > newest - ring))
            target = torch.where(stays, torch.where(pos < sink, pos, sink + (pos - sink) % ring), N)
            slots = torch.arange(C, device=pos.device).expand_as(pos)
            source = torch.zeros(*pos.shape[:2], N + 1, dtype=torch.long, device=pos.device)
            source = source.scatter(2, target, slots)[..., :N]
            keep = torch.zeros(*pos.shape[:2], N + 1, dtype=torch.bool, device=pos.device)
            keep = keep.scatter(2, target, stays)[..., :N]
        names, D = ("k", "v", *self.slot_state), self.site.head_dim
        fills = {"k": 0.0, "v": 0.0} | {n: fill for n, (_, fill) in self.slot_state.items()}
        for name in names:
            old = getattr(self, name)
            idx = source if old.dim() == 3 else source[..., None].expand(*source.shape, D)
            kept = old[:, :, :C].gather(2, idx)
            mask = keep if old.dim() == 3 else keep[..., None]
            new = torch.full((*old.shape[:2], N + 1, *old.shape[3:]), fills[name], dtype=old.dtype,
                             device=old.device)  # fmt: skip
            new[:, :, :N] = torch.where(mask, kept, fills[name])
            setattr(self, name, new)
        self.layout = layout

    def write_ring(self, k: Tensor, v: Tensor, kv_pos: Tensor) -> None:
        """Store the new tokens by the layout's sink + ring rule (overwriting = evicting)."""
        lay = self.layout
        r = kv_pos
        slot = torch.where(r < lay.sink, r, lay.sink + (r - lay.sink) % lay.ring)
        # A token whose ring slot is taken again later in the same chunk is never stored.
        last = r.amax(dim=1, keepdim=True)
        dropped = (r < 0) | ((r >= lay.sink) & (r + lay.ring <= last))
        self._put(torch.where(dropped, lay.capacity, slot), k, v, torch.where(dropped, -1, r), {})

    def write_free(self, k: Tensor, v: Tensor, kv_pos: Tensor, state: dict[str, Tensor]) -> None:
        """Store the new tokens in the empty slots, lowest first (the method made enough room).

        ``kv_pos`` is ``[B, L]``, or ``[B, H_kv, L]`` when a method keeps different new tokens
        per head (``-1``: not stored). ``state`` gives the method's per-slot state of the new
        tokens, ``[B, H_kv, L]`` each.
        """
        C = self.capacity
        B, H, L, _ = k.shape
        free = self.pos[:, :, :C] < 0  # [B, H, C]
        rank = free.long().cumsum(-1) - 1
        # slots_by_rank[b, h, i] = the i-th free slot (trash beyond the free ones).
        slots_by_rank = torch.full_like(self.pos, C)
        slots = torch.arange(C, device=k.device).expand_as(rank)
        slots_by_rank.scatter_(2, torch.where(free, rank, C), slots)
        kv_pos = kv_pos if kv_pos.dim() == 3 else kv_pos[:, None, :].expand(B, H, L)
        real = kv_pos >= 0
        token_rank = (real.long().cumsum(-1) - 1).clamp_min(0)
        slot = torch.where(real, slots_by_rank.gather(2, token_rank), C)
        pos = torch.where(slot == C, -1, kv_pos)
        self._put(slot, k, v, pos, state)

    def _put(
        self, slot: Tensor, k: Tensor, v: Tensor, pos: Tensor, state: dict[str, Tensor]
    ) -> None:
        """Write ``k, v [B, H, L, D]`` and ``pos`` into ``slot`` (``[B, L]`` or ``[B, H, L]``)."""
        B, H, L, _ = k.shape
        if slot.dim() == 2:
            slot, pos = slot[:, None, :].expand(B, H, L), pos[:, None, :].expand(B, H, L)
        rows = torch.arange(B, device=k.device)[:, None, None]
        heads = torch.arange(H, device=k.device)[None, :, None]
        index = (rows, heads, slot)
        self.k.index_put_(index, k.to(self.k.dtype))
        self.v.index_put_(index, v.to(self.v.dtype))
        self.pos.index_put_(index, pos)
        for name, (dtype, _) in self.slot_state.items():
            if name != "pos":
                value = state.get(name, torch.zeros((), dtype=dtype, device=k.device))
                getattr(self, name).index_put_(index, value.to(dtype).expand(B, H, L))
