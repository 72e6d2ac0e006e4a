"""One attention layer's fixed-capacity slot cache: the module the SDPA pass swaps in.

The cache joins a token policy (``method``: which tokens to keep, evict or merge) and a storage
(``storage``: how the K/V rows live and are read). It owns the slot bookkeeping, as buffers
mutated in place so ``torch.compile`` and AOTInductor carry them:

* ``pos``: ``[B, H_kv, C + 1]`` int32 position of each slot's (last) token, ``-1`` = empty;
* whatever per-slot statistics the policy declares (``[B, H_kv, C + 1]`` each), among them
  ``logc``, float32 log cardinality, for a policy whose slots hold merged tokens (a policy that
  only keeps or drops tokens stores none: :meth:`LayerCache.log_cardinality` is zero), and
  ``merge_stats [4]`` (float64): tokens merged or dropped, fallbacks (KVSlimmer's closed form,
  WeightedKV's fold weights), the most tokens one step merged or dropped in one row and KV head,
  and the most slots one merge joined.

A step attends over the slots and the new tokens, then stores the new tokens: by the layout's
ring rule, or by the plan the policy returns (:class:`~kvslim_fx.plan.Plan`), which
:meth:`LayerCache.apply` carries out, the only code that writes the buffers. Whether a step is
one token (decode: ``Method.plan_one``) or a chunk (``Method.plan``) is decided here, once.

The extra last slot is a trash slot: padding and tokens superseded within their own chunk are
written there with position ``-1``, which keeps every write a static-shape ``index_put_``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import KVSlimError
from .kernels.slots import gather_slots, put_slots, slot_index
from .methods import Method, SlotLayout
from .methods.scoring import fold_right
from .plan import Plan
from .storage import Storage

# int32 positions: the bookkeeping is part of the cache's bytes (a quarter of them for a factored
# storage at 8×), and no model has 2³¹ positions.
_BASE_STATE = {"pos": (torch.int32, -1)}


class LayerCache(nn.Module):
    """Cached attention for one layer: attend over slots ∪ new tokens, then store the new tokens."""

    def __init__(self, method: Method, storage: Storage) -> None:
        super().__init__()
        self.method = method
        self.storage = storage
        self.site = storage.site
        self.layout: SlotLayout | None = None
        self.slot_state = {**_BASE_STATE, **method.slot_state()}
        for name in ("merge_stats", *self.slot_state):
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
        self.layout = self.method.layout(slots, self.site.window, self.site.layer)
        s = self.site
        if observe:
            self.window_q = torch.zeros(batch, s.num_q_heads, observe, s.head_dim, dtype=dtype,
                                        device=device)  # fmt: skip
            self.window_pos = torch.full((batch, observe), -1, dtype=torch.long, device=device)
        else:
            self.window_q = self.window_pos = None
        shape = (batch, s.num_kv_heads, self.layout.capacity + 1)
        self.storage.allocate(batch, shape[2], dtype, device)
        if self.pos.shape != shape or self.pos.device != device:
            for name, (state_dtype, _) in self.slot_state.items():
                setattr(self, name, torch.empty(shape, dtype=state_dtype, device=device))
            self.merge_stats = torch.zeros(4, dtype=torch.float64, device=device)
        for name, (_, fill) in self.slot_state.items():
            getattr(self, name).fill_(fill)
        self.merge_stats.zero_()

    def diagnostics(self) -> dict[str, float]:
        """What would reveal a degenerate regime: occupancy, the largest slots, merge counts.

        ``occupied``: the most slots in use in one row and KV head; ``largest_slot`` and
        ``p99_slot``: the largest cardinality (tokens in one slot) and its 99th percentile over
        the occupied slots; ``merged``, ``fallbacks``, ``most_per_step``, ``most_joined``: as
        ``merge_stats``; then the storage's own (:meth:`~kvslim_fx.storage.Storage.diagnostics`).
        """
        C = self.capacity
        occupied = self.pos[:, :, :C] >= 0
        cards = self.log_cardinality()[:, :, :C].exp()[occupied].double()
        stats = self.merge_stats.tolist()
        return {
            "occupied": int(occupied.sum(-1).max()) if C else 0,
            "largest_slot": float(cards.max()) if cards.numel() else 0.0,
            "p99_slot": float(cards.quantile(0.99)) if cards.numel() else 0.0,
            "merged": stats[0],
            "fallbacks": stats[1],
            "most_per_step": stats[2],
            "most_joined": stats[3],
            **self.storage.diagnostics(),
        }

    def log_cardinality(self) -> Tensor:
        """``[B, H_kv, C + 1]`` log of the tokens each slot holds: the policy's ``logc``, or a
        broadcast zero (no memory) for a policy whose slots hold one token each."""
        if "logc" in self.slot_state:
            return self.logc
        return self.pos.new_zeros((), dtype=torch.float32).expand(self.pos.shape)

    def nbytes(self) -> int:
        """Bytes of the ``capacity`` slots (the storage's rows and the per-slot state; the trash
        slot excluded)."""
        state = [getattr(self, n) for n in self.slot_state]
        per_slot = sum(t[:, :, :1].numel() * t.element_size() for t in state)
        return self.storage.nbytes(self.capacity) + per_slot * self.capacity

    def forward(self, q: Tensor, k: Tensor, v: Tensor, kv_pos: Tensor) -> Tensor:
        """``q [B, H_q, L, D]``, ``k, v [B, H_kv, L, D]``, ``kv_pos [B, L]`` → ``[B, H_q, L, D]``"""
        lay = self.layout
        if self.window_q is not None:
            W = self.window_q.shape[2]
            self.window_q.copy_(torch.cat([self.window_q, q], dim=2)[:, :, -W:])
            self.window_pos.copy_(torch.cat([self.window_pos, kv_pos], dim=1)[:, -W:])
        out, mass = self.storage.attend(
            q, k, v, self.method.attention_logc(self.log_cardinality()), self.pos, kv_pos, lay.sink,
            lay.recent, lay.merges,
        )  # fmt: skip
        if lay.merges:
            # Inductor's reorder_for_locality moves the output's product with the V rows next to
            # its consumer, after this step's writes to them; a read of the old rows after a
            # write makes it copy the whole V cache every step (twice) instead of writing in
            # place. The plan depends on the mass, so tying the mass to the output keeps the
            # product before the writes (0 times a finite sum adds nothing).
            mass = mass + 0 * out.sum()
        self.store(k, v, kv_pos, mass)
        return out

    def store(self, k: Tensor, v: Tensor, kv_pos: Tensor, mass: Tensor) -> None:
        """Store a step's new tokens after attention (``mass`` as ``attend``'s): by the ring rule,
        or by the policy's plan, the one-token rule for a step known to be one token."""
        if not self.layout.merges:
            self.write_ring(k, v, kv_pos)
            return
        # A symbolic length (a package's general step) is not known to be 1.
        L = k.shape[2]
        if isinstance(L, int) and L == 1:
            plan = self.method.plan_one(self, k, v, kv_pos, mass)
        else:
            plan = self.method.plan(self, k, v, kv_pos, mass)
        self.apply(plan, k, v, kv_pos)

    def window_mass(self) -> tuple[Tensor, Tensor]:
        """The attention of the prompt's last queries (those the layer keeps: the method's
        ``observe``, at most the model's ``prefill_window``) over the cache: ``mass`` and ``seen``
        ``[B, H_kv, C]`` (:func:`~kvslim_fx.kernels.attention.window_mass`)."""
        C = self.capacity
        logc = self.method.attention_logc(self.log_cardinality()[:, :, :C])
        return self.storage.window_mass(self.window_q, self.window_pos, logc,
                                        self.pos[:, :, :C], C)  # fmt: skip

    def end_prompt(self, slots: int) -> None:
        """Compress a cache that holds the whole prompt to ``slots`` per layer, scored by the
        prompt's last queries (the policy's plans, applied one by one: a policy may re-score
        between rounds); then hold ``slots`` (the method's layout for them) from here."""
        B, H = self.pos.shape[:2]
        none = self.storage.values().new_zeros(B, H, 0, self.site.head_dim)
        no_pos = self.pos.new_zeros(B, 0)
        for plan in self.method.prompt_plans(self, slots):
            self.apply(plan, none, none, no_pos)
        self.window_q = self.window_pos = None
        layout = self.method.layout(slots, self.site.window, self.site.layer)
        if layout != self.layout:
            self._compact(layout)

    # --- the one writer ---------------------------------------------------------------------

    def apply(self, plan: Plan, k: Tensor, v: Tensor, kv_pos: Tensor) -> None:
        """Carry out ``plan`` (see :class:`~kvslim_fx.plan.Plan` for the order) for the step's
        new tokens ``k, v [B, H_kv, L, D]`` at ``kv_pos [B, L]`` (``L`` may be 0)."""
        C = self.capacity
        for name, value in plan.state.items():
            getattr(self, name)[:, :, :C] = value
        if plan.stage:  # the new token waits in the trash row, where the merge may read it
            trash = torch.full_like(kv_pos[:, None, :].expand(*k.shape[:3]), C)
            self.storage.write(trash, k, v)
        if plan.merge is not None:
            self._merge(plan.merge)
        if plan.fold is not None:
            v = self._fold(plan.fold, v)
        if plan.drop is not None:
            for name, (_, fill) in self.slot_state.items():
                getattr(self, name)[:, :, :C].masked_fill_(plan.drop, fill)
        self._store(plan, k, v, kv_pos)
        if plan.events is not None:
            self.merge_stats[0] += plan.events.sum().double()
            most = torch.stack([plan.events.max().double(),
                                torch.as_tensor(plan.joined).max().double()])  # fmt: skip
            self.merge_stats[2:] = torch.maximum(self.merge_stats[2:], most)
        if plan.fallbacks is not None:
            self.merge_stats[1] += plan.fallbacks.sum().double()

    def _merge(self, merge) -> None:
        """Pairs of rows: the storage combines them, the bookkeeping follows (``dst`` keeps its
        position, ``src`` is emptied; cardinalities add when the values are means)."""
        if merge.counts and "logc" not in self.slot_state:
            raise KVSlimError(
                f"method {self.method.name!r} merges means (Merge.counts) but keeps no "
                f"cardinalities: declare 'logc' (float32, 0.0) in its slot_state()"
            )
        src, dst, do = merge.src, merge.dst, merge.do
        gap = gather_slots(self.pos, dst) - gather_slots(self.pos, src)
        self.storage.merge(src, dst, do, merge.key, merge.value, gap)
        if merge.counts:
            card = gather_slots(self.logc, src).exp() + gather_slots(self.logc, dst).exp()
            put_slots(self.logc, dst, card.log(), do)
        for name, value in merge.state.items():
            put_slots(getattr(self, name), dst, value, do)
        for name, (_, fill) in self.slot_state.items():
            state = getattr(self, name)
            empty = torch.full(src.shape, fill, dtype=state.dtype, device=src.device)
            put_slots(state, src, empty, do)

    def _fold(self, fold, v: Tensor) -> Tensor:
        """Fold runs of dropped entries' values rightwards in position order; rewrites the slots'
        values and returns the new tokens' ``v``."""
        C = self.capacity
        values = torch.cat([self.storage.values()[:, :, :C].float(), v.float()], dim=2)
        index = fold.order[..., None].expand_as(values)
        merged, fallback = fold_right(values.gather(2, index), fold.weight, fold.drop)
        merged = torch.empty_like(merged).scatter_(2, index, merged)
        slots = torch.arange(C, device=v.device).expand(*v.shape[:2], C)
        self.storage.write(slots, None, merged[:, :, :C])
        self.merge_stats[1] += fallback.sum().double()
        return merged[:, :, C:].to(v.dtype)

    def _store(self, plan: Plan, k: Tensor, v: Tensor, kv_pos: Tensor) -> None:
        """Store the step's new tokens where the plan says, with their state."""
        B, H, L, _ = k.shape
        C = self.capacity
        kv_pos = kv_pos[:, None, :].expand(B, H, L)
        if plan.slot is not None:
            slot = plan.slot
        else:
            keep = kv_pos >= 0 if plan.keep is None else plan.keep & (kv_pos >= 0)
            slot = self._free_slots(keep)
        if plan.stage:  # the staged token (merged or not) moves from the trash row
            self.storage.move(torch.full_like(slot, C), slot)
        else:
            self.storage.write(slot, k, v)
        index = slot_index(slot)
        self.pos.index_put_(index, torch.where(slot == C, -1, kv_pos).to(self.pos.dtype))
        for name, value in plan.new_state.items():
            state = getattr(self, name)
            state.index_put_(index, value.to(state.dtype).expand(B, H, L))
        for name, (dtype, fill) in self.slot_state.items():
            if name not in ("pos", *plan.new_state):
                getattr(self, name).index_put_(
                    index, torch.full((), fill, dtype=dtype, device=k.device).expand(B, H, L)
                )

    def _free_slots(self, keep: Tensor) -> Tensor:
        """``[B, H, L]`` the empty slots, lowest first, for the new tokens where ``keep``
        (``[B, H, L]``); ``C`` (the trash slot) for the others and for those that find none."""
        C = self.capacity
        free = self.pos[:, :, :C] < 0  # [B, H, C]
        if keep.shape[-1] == 1 and isinstance(keep.shape[-1], int):
            slots = torch.arange(C, device=keep.device)
            lowest = torch.where(free, slots, C).amin(dim=-1, keepdim=True)
            return torch.where(keep, lowest, C)
        rank = free.long().cumsum(-1) - 1
        # slots_by_rank[b, h, i] = the i-th free slot (trash beyond the free ones).
        slots_by_rank = torch.full_like(self.pos, C, dtype=torch.long)
        slots = torch.arange(C, device=keep.device).expand_as(rank)
        slots_by_rank.scatter_(2, torch.where(free, rank, C), slots)
        token_rank = (keep.long().cumsum(-1) - 1).clamp_min(0)
        return torch.where(keep, slots_by_rank.gather(2, token_rank), C)

    def write_ring(self, k: Tensor, v: Tensor, kv_pos: Tensor) -> None:
        """Store the new tokens by the layout's sink + ring rule (overwriting = evicting)."""
        lay = self.layout
        r = kv_pos
        slot = torch.where(r < lay.sink, r, lay.sink + (r - lay.sink) % lay.ring)
        # A token whose ring slot is taken again later in the same chunk is never stored.
        last = r.amax(dim=1, keepdim=True)
        dropped = (r < 0) | ((r >= lay.sink) & (r + lay.ring <= last))
        B, H, L, _ = k.shape
        slot = torch.where(dropped, lay.capacity, slot)[:, None, :].expand(B, H, L)
        self.storage.write(slot, k, v)
        pos = torch.where(dropped, -1, r).to(self.pos.dtype)
        self.pos.index_put_(slot_index(slot), pos[:, None, :].expand(B, H, L))

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
            target = target.long()
            slots = torch.arange(C, device=pos.device).expand_as(pos)
            source = torch.zeros(*pos.shape[:2], N + 1, dtype=torch.long, device=pos.device)
            source = source.scatter(2, target, slots)[..., :N]
            keep = torch.zeros(*pos.shape[:2], N + 1, dtype=torch.bool, device=pos.device)
            keep = keep.scatter(2, target, stays)[..., :N]
        self.storage.take(source, keep)
        for name, (_, fill) in self.slot_state.items():
            old = getattr(self, name)
            kept = torch.where(keep, old[:, :, :C].gather(2, source), fill)
            setattr(self, name, torch.cat([kept, torch.full_like(kept[:, :, :1], fill)], dim=2))
        self.layout = layout
