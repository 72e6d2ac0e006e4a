"""``xkv`` (xKV, Chang et al. 2025): the prompt's keys and values factored across layers.

Adjacent layers' keys share their dominant singular directions. When the prompt ends, each group of
``group`` consecutive layers concatenates its layers' keys (before RoPE) of the prompt's tokens
along the channels, ``X = [K_1 | … | K_G]`` ``[T, G·H_kv·D]``, and keeps the truncated SVD ``X ≈ U_r
(Σ_r V_rᵀ)``: one token basis ``U_r [T, r_k]`` for the group (its shared state) and one factor ``F_l
[r_k, H_kv·D]`` per layer (layer ``l``'s block of ``Σ_r V_rᵀ``); values likewise with ``r_v``.
Attention (``kvslim::attend_latent``: the token basis as the latents, the layer's factors as a basis
per sequence) rebuilds a prompt token's key as ``U_r[t] F_l``, rotated to its position (keys are
kept before RoPE, so the factors span un-rotated keys). Tokens after the prompt are stored dense, as
in the reference. Per sequence (batch row) its own SVD, as the reference's. ``‖X − U_r Σ_r V_rᵀ‖_F²
= Σ_{i > r} σ_i²`` (Eckart–Young): the diagnostics report the dropped fraction of that energy per
group (``key_error``, ``value_error``, relative Frobenius norms).

Ranks: ``ratio`` (default 1/8) is the kept fraction of the group's dense numbers per token,
``r_k + r_v = ratio · 2 · G·H_kv·D``, split ``key_share`` (default 0.4) to keys: the reference's
settings for Llama-3.1-8B, ``(r_k, r_v) = (96, 144) · G`` for ``H_kv·D = 1024``, are ratio 0.117
and key share 0.4 at every ``G``. ``rank_k`` and ``rank_v`` set them directly. Ranks are capped
at the group's width and at the prompt's length.

Sliding-window layers stay dense (their ring of slots is rewritten while decoding, so a factored
slot would be overwritten); groups are formed from the other layers in order. The prompt's
tokens must be the cache's first slots in every row (``full``: a token's slot is its index), so
``full`` is the one policy this storage composes with: a policy that drops or merges slots would
have to edit ``U``'s rows, which nothing here does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import KVSlimError
from ..kernels.slots import gather_slots, slot_index
from .base import KEY_SHARE, check_fraction, register_storage
from .dense import Dense


class XKVGroup(nn.Module):
    """A group's token bases ``u_k [B, T, r_k]``, ``u_v [B, T, r_v]`` and its layers' storages
    (a plain list, not submodules: each storage owns this module)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("u_k", torch.empty(0), persistent=False)
        self.register_buffer("u_v", torch.empty(0), persistent=False)
        self.members: list[XKV] = []
        self.waiting: dict[int, int] = {}  # layer → the prompt slots it reported

    def reset(self, device: torch.device, dtype: torch.dtype) -> None:
        self.u_k = torch.zeros(0, dtype=dtype, device=device)
        self.u_v = torch.zeros(0, dtype=dtype, device=device)
        self.waiting = {}

    def arrive(self, storage: XKV, tokens: int) -> None:
        """A layer's prompt ended with ``tokens`` leading slots filled in every row; the last
        layer of the group to arrive factors them all."""
        self.waiting[storage.site.layer] = tokens
        if len(self.waiting) == len(self.members):
            tokens = min(self.waiting.values())
            self.waiting = {}
            if tokens:
                self.factor(tokens)

    def factor(self, tokens: int) -> None:
        """Replace every member's first ``tokens`` rows by the group's truncated SVD."""
        first = self.members[0]
        widths = [m.width for m in self.members]
        for name in ("k", "v"):
            # [B, T, G·H_kv·D] in float32: a 16-bit SVD is not supported and loses the tail.
            rows = torch.cat([m.flat_rows(name, tokens) for m in self.members], dim=-1).float()
            u, sigma, vh = torch.linalg.svd(rows, full_matrices=False)
            rank = min(getattr(first, f"rank_{name}"), sigma.shape[-1])
            kept = (sigma[..., :rank] ** 2).sum(-1)
            total = (sigma**2).sum(-1).clamp_min(1e-30)
            error = float(((total - kept).clamp_min(0) / total).sqrt().max())
            setattr(self, f"u_{name}", u[..., :rank].to(first.k.dtype).contiguous())
            factors = (sigma[..., :rank, None] * vh[..., :rank, :]).split(widths, dim=-1)
            for m, factor in zip(self.members, factors, strict=True):
                m.take_factor(name, factor.to(m.k.dtype).contiguous(), tokens, error)


@register_storage
class XKV(Dense):
    """Dense rows ``k, v [B, H_kv, R − T, D]`` for the slots after the prompt's ``T``, factors
    ``f_k [B, r_k, H_kv·D]``, ``f_v [B, r_v, H_kv·D]`` for the prompt's, and the group's token
    bases (``shared``); see the module docstring."""

    name = "xkv"
    pre_rope_default = True

    def __init__(self, site, rope=None, group: int = 4, ratio: float = 0.125,
                 key_share: float = 0.4, rank_k: int | None = None, rank_v: int | None = None,
                 **base) -> None:  # fmt: skip
        super().__init__(site, rope, **base)
        if not self.pre_rope:
            raise KVSlimError("xkv: keys are kept before RoPE (the factors span un-rotated "
                              "keys); drop pre_rope=false")  # fmt: skip
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise KVSlimError(f"xkv: group must be a whole number of layers >= 1, got {group!r}")
        ratio = check_fraction("xkv", "ratio", ratio, closed=True,
                               meaning="the kept fraction of the group's numbers")  # fmt: skip
        key_share = check_fraction("xkv", "key_share", key_share, closed=False, meaning=KEY_SHARE)
        for name, rank in (("rank_k", rank_k), ("rank_v", rank_v)):
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                     or rank < 1):  # fmt: skip
                raise KVSlimError(f"xkv: {name} must be a whole number >= 1, got {rank!r}")
        self.group, self.ratio, self.key_share = group, ratio, key_share
        self.width = site.num_kv_heads * site.head_dim
        numbers = 2 * group * self.width * self.ratio  # kept per token for the whole group
        self.rank_k = rank_k or max(1, round(numbers * self.key_share))
        self.rank_v = rank_v or max(1, round(numbers - numbers * self.key_share))
        self._explicit = {n: r for n, r in (("rank_k", rank_k), ("rank_v", rank_v)) if r}
        self.tokens = 0  # the prompt's slots held as factors
        self.errors = {"k": 0.0, "v": 0.0}
        for name in ("f_k", "f_v"):
            self.register_buffer(name, torch.empty(0), persistent=False)

    @property
    def factored(self) -> bool:
        """Whether this layer joins a group (sliding-window layers stay dense)."""
        return self.site.window == 0

    @classmethod
    def check_method(cls, method) -> None:
        if method.name != "full":
            raise KVSlimError(
                f"storage 'xkv' cannot carry method {method.name!r}: xkv factors the prompt's "
                "slots together, and a policy that drops or merges slots would have to edit the "
                "group's token basis; use method='full' (a smaller cache comes from the ranks)"
            )

    @classmethod
    def finish_layers(cls, storages: list[XKV]) -> None:
        factored = [s for s in storages if s.factored]
        for i, s in enumerate(factored):
            group = s.shared_state(("xkv", i // s.group), XKVGroup)
            group.members.append(s)

    def flat_rows(self, name: str, tokens: int) -> Tensor:
        """The first ``tokens`` dense rows of ``k`` or ``v`` as ``[B, tokens, H_kv·D]``."""
        rows = getattr(self, name)[:, :, :tokens]
        B, H, T, D = rows.shape
        return rows.transpose(1, 2).reshape(B, T, H * D)

    def take_factor(self, name: str, factor: Tensor, tokens: int, error: float) -> None:
        """Hold ``factor [B, r, H_kv·D]`` for the first ``tokens`` slots and drop their rows."""
        setattr(self, f"f_{name}", factor)
        setattr(self, name, getattr(self, name)[:, :, tokens:].clone())
        self.tokens = tokens
        self.errors[name] = error

    def allocate(self, batch: int, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        super().allocate(batch, rows, dtype, device)
        self.tokens, self.errors = 0, {"k": 0.0, "v": 0.0}
        self.f_k = torch.zeros(0, dtype=dtype, device=device)
        self.f_v = torch.zeros(0, dtype=dtype, device=device)
        if self.shared is not None:
            self.shared.reset(device, dtype)

    def end_prompt(self, pos: Tensor) -> None:
        # Factored once per prompt: a later end_prompt before a reset leaves its tokens dense.
        if not self.factored or self.tokens:
            return
        # The prompt's slots: the leading run filled in every row and head (full fills slots in
        # order; a shorter, left-padded row fills fewer).
        filled = (pos[..., :-1] >= 0).long().cumprod(-1).sum(-1)  # [B, H_kv]
        self.shared.arrive(self, int(filled.min()))

    def _rows(self, name: str) -> Tensor:
        """Every row ``[B, H_kv, R, D]`` of ``k`` or ``v``: the prompt's rebuilt, then dense."""
        dense = getattr(self, name)
        if not self.tokens:
            return dense
        u = getattr(self.shared, f"u_{name}")  # [B, T, r]
        rebuilt = (u.float() @ getattr(self, f"f_{name}").float()).to(dense.dtype)
        B, T, _ = rebuilt.shape
        rebuilt = rebuilt.view(B, T, self.site.num_kv_heads, -1).transpose(1, 2)
        return torch.cat([rebuilt, dense], dim=2)

    def keys(self) -> Tensor:
        return self._rows("k")

    def values(self) -> Tensor:
        return self._rows("v")

    def attend(self, q, k, v, logc, pos, kv_pos, sink, recent, return_mass):
        if not self.tokens:
            return super().attend(q, k, v, logc, pos, kv_pos, sink, recent, return_mass)
        latents = (self.shared.u_k[:, None], self.shared.u_v[:, None])  # [B, 1, T, r]
        bases = (self.f_k.transpose(1, 2), self.f_v.transpose(1, 2))  # [B, H_kv·D, r]
        return self.attend_latent(q, k, v, latents, bases, (self.k, self.v), logc, pos, kv_pos,
                                  sink, recent, return_mass)  # fmt: skip

    def write(self, slot: Tensor, k: Tensor | None, v: Tensor | None) -> None:
        # Slots after the prompt's are dense rows ``slot − tokens`` (full never writes before).
        index = slot_index(slot - self.tokens)
        if k is not None:
            self.k.index_put_(index, k.to(self.k.dtype))
        if v is not None:
            self.v.index_put_(index, v.to(self.v.dtype))

    def move(self, src: Tensor, dst: Tensor) -> None:
        src, index = src - self.tokens, slot_index(dst - self.tokens)
        for buf in (self.k, self.v):
            buf.index_put_(index, gather_slots(buf, src))

    def nbytes(self, capacity: int) -> int:
        factors = sum(t.numel() * t.element_size() for t in (self.f_k, self.f_v))
        return self.slot_bytes() * (capacity - self.tokens) + factors

    def diagnostics(self) -> dict[str, float]:
        return {"rank_k": self.rank_k, "rank_v": self.rank_v, "factored_tokens": self.tokens,
                "key_error": self.errors["k"], "value_error": self.errors["v"]}  # fmt: skip

    def extra_repr(self) -> str:
        if not self.factored:
            return "dense (sliding-window layer)"
        return f"group={self.group}, rank_k={self.rank_k}, rank_v={self.rank_v} of " \
            f"{self.group * self.width}"  # fmt: skip

    def options(self) -> dict:
        return {**super().options(), "group": self.group, "ratio": self.ratio,
                "key_share": self.key_share, **self._explicit}  # fmt: skip
