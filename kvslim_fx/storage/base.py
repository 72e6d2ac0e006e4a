"""What a storage is: how one layer's K/V rows are allocated, written, merged and read.

A storage never decides which tokens to keep (that is a token policy's plan) and never tracks
positions (that is the cache's bookkeeping). It holds ``R = capacity + 1`` rows per batch row
and KV head, the last being the trash row (padding and dropped tokens are written there, which
keeps every write a static-shape ``index_put_``; a one-token step may stage its token there).
Its tensors are buffers, so ``state()``, ``torch.compile`` and AOTInductor carry them.

Keys are stored as the model computes them for attention (after RoPE), or with ``pre_rope``
before the rotary embedding: the SDPA pass then hands the cache un-rotated keys, a merge needs
no rotation (the merged slot is rotated to its position when read), and every read
(:meth:`Storage.attend`, :meth:`Storage.window_mass`) rotates the keys to their positions.
Storages that factor keys across positions (low rank, shared across layers) need it; ``dense``
and ``int8`` take it as an option (``"dense:pre_rope=true"``), the same results either way.

Two hooks serve storages that are more than rows. :meth:`Storage.shared_state` gives the layers
of a group one module (xKV factors a group of layers' keys together): its buffers are state
that ``state()``, ``cache_bytes()``, ``torch.compile`` and AOTInductor see once.
:meth:`Storage.end_prompt` runs once after the prompt (eagerly: :func:`kvslim_fx.generate` calls
it through :meth:`KVSlimModel.end_prompt`), where such a storage re-encodes what the prompt
left.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import KVSlimError
from ..kernels.attention import window_mass  # (importing it registers kvslim::attend)
from ..kernels.run_merge import rope_rotate
from ..kernels.slots import gather_slots
from ..passes.rope import RopeFacts
from ..passes.sdpa import AttentionSite
from ..registry import register


class Storage(nn.Module):
    """Base of every storage. Subclasses set ``name`` and implement the row methods.

    Shapes: rows ``[B, H_kv, R, D]``, slot indices ``[B, H_kv, M]`` (int64, ``< R``).
    """

    name: ClassVar[str]
    # Whether keys are kept before RoPE unless the ``pre_rope`` option says otherwise.
    pre_rope_default: ClassVar[bool] = False
    # Whether the storage reads the layer's key/value projections (``site.key_proj``, ...).
    needs_projections: ClassVar[bool] = False

    def __init__(
        self,
        site: AttentionSite,
        rope: RopeFacts | None = None,
        pre_rope: bool | None = None,
        groups: dict[Hashable, nn.Module] | None = None,
    ) -> None:
        """``groups``: the modules layers share, by key (one dict per ``transform``)."""
        super().__init__()
        pre_rope = self.pre_rope_default if pre_rope is None else pre_rope
        if not isinstance(pre_rope, bool):
            raise TypeError(f"pre_rope must be true or false, got {pre_rope!r}")
        self.site = site
        self.rope = rope
        self.pre_rope = pre_rope
        self._groups = {} if groups is None else groups
        self.shared: nn.Module | None = None

    def shared_state(self, key: Hashable, make: Callable[[], nn.Module]) -> nn.Module:
        """The module every layer asking for ``key`` shares (``make()`` builds it for the first),
        registered as this storage's ``shared`` submodule. A layer joins one group."""
        if self.shared is not None:
            raise ValueError(f"layer {self.site.layer} already shares state with a group")
        if key not in self._groups:
            self._groups[key] = make()
        self.shared = self._groups[key]
        return self.shared

    @classmethod
    def check_method(cls, method) -> None:
        """Refuse (``KVSlimError``) a token policy whose plans this storage cannot carry out."""

    @classmethod
    def finish_layers(cls, storages: list[Storage]) -> None:
        """Runs once when every layer of a model has its storage (in layer order): settings that
        depend on all layers, such as a rank per layer. Default: nothing to do."""

    def end_prompt(self, pos: Tensor) -> None:
        """Runs once after the prompt's last chunk, after a question-aware prefill compressed the
        cache; ``pos [B, H_kv, R]``: each row's position (``-1``: empty), the cache's
        bookkeeping. Default: nothing to do."""

    def begin_calibration(self) -> None:
        """Start recording what :meth:`end_calibration` fits (``KVSlimModel.calibrate`` calls
        both around one eager pass). A storage that learns nothing from data refuses."""
        raise KVSlimError(f"storage {self.name!r} learns nothing from data: calibrate() serves "
                          "storages that do, such as lorc")  # fmt: skip

    def end_calibration(self, fit: bool = True) -> None:
        """Stop recording; ``fit``: fit from what was recorded since :meth:`begin_calibration`,
        else (the pass failed) restore what was there before."""

    @property
    def has_prompt_hook(self) -> bool:
        return type(self).end_prompt is not Storage.end_prompt

    @property
    def merge_rope(self) -> RopeFacts | None:
        """The rotation a merge applies to the source key by the position gap: none for keys
        stored before RoPE (or a model without it)."""
        return None if self.pre_rope else self.rope

    @property
    def rotates_at_read(self) -> bool:
        """Keys are stored before a rotary embedding the model has: reads rotate them."""
        return self.pre_rope and self.rope is not None

    def rotated(self, keys: Tensor, pos: Tensor) -> Tensor:
        """``keys [B, H_kv, N, D]`` as attention reads them: rotated to ``pos [B, H_kv, N]``
        (HF's cos/sin, ``attention_scaling`` included) when stored before RoPE, else as they are.
        A negative position (padding, an empty slot) is rotated as position 0, as HF does."""
        rope = self.rope
        if not self.rotates_at_read:
            return keys
        out = rope_rotate(keys, pos.clamp_min(0), rope.inv_freq, rope.rotary_dim)
        if rope.attention_scaling == 1.0:
            return out
        r = rope.rotary_dim
        return torch.cat([out[..., :r] * rope.attention_scaling, out[..., r:]], dim=-1)

    def rotated_new(self, k: Tensor, kv_pos: Tensor) -> Tensor:
        """:meth:`rotated` for a step's new keys ``k [B, H_kv, L, D]`` at ``kv_pos [B, L]``."""
        return self.rotated(k, kv_pos[:, None, :].expand(k.shape[:3]))

    def allocate(self, batch: int, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make room for ``rows`` rows (zeros), re-allocating only if the shape, dtype or
        device changes (a compiled model then keeps its graphs)."""
        raise NotImplementedError

    def keys(self) -> Tensor:
        """``[B, H_kv, R, D]`` every row's key as attention reads it."""
        raise NotImplementedError

    def values(self) -> Tensor:
        """``[B, H_kv, R, D]`` every row's value as attention reads it."""
        raise NotImplementedError

    def rows(self, slot: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, H_kv, M, D]`` of rows ``slot [B, H_kv, M]``."""
        return gather_slots(self.keys(), slot), gather_slots(self.values(), slot)

    def write(self, slot: Tensor, k: Tensor | None, v: Tensor | None) -> None:
        """Store ``k, v [B, H_kv, M, D]`` in rows ``slot [B, H_kv, M]`` (None: leave as is).
        Several tokens may target the trash row; no other row twice."""
        raise NotImplementedError

    def move(self, src: Tensor, dst: Tensor) -> None:
        """Copy rows ``src`` to rows ``dst`` (``[B, H_kv, M]``) as they are stored (no
        re-encoding: a staged token keeps its exact bytes)."""
        self.write(dst, *self.rows(src))

    def merge(
        self,
        src: Tensor,
        dst: Tensor,
        do: Tensor,
        key: tuple[Tensor, Tensor] | None,
        value: tuple[Tensor, Tensor],
        gap: Tensor,
    ) -> None:
        """Where ``do``, row ``dst`` becomes ``w_src · row[src] + w_dst · row[dst]`` (keys by the
        ``key`` weights, the source key first moved forward by ``gap`` positions; None: ``dst``
        keeps its key), in float32. ``[B, H_kv, P]`` each, disjoint pairs."""
        raise NotImplementedError

    def take(self, source: Tensor, keep: Tensor) -> None:
        """Shrink to ``N + 1`` rows: row ``i < N`` becomes row ``source[..., i]`` where ``keep``
        (zeros elsewhere), row ``N`` is a fresh trash row. ``source, keep: [B, H_kv, N]``."""
        raise NotImplementedError

    def diagnostics(self) -> dict[str, float]:
        """What the storage reports per layer beside the cache's diagnostics (e.g. ranks)."""
        return {}

    def slot_bytes(self) -> int:
        """Bytes one slot costs across the batch and KV heads (everything stored per row; a
        group's ``shared`` state is counted once by the model)."""
        raise NotImplementedError

    def nbytes(self, capacity: int) -> int:
        """Bytes the rows of ``capacity`` slots take (the trash row excluded): ``slot_bytes()``
        each, unless some rows are held otherwise (xkv's factored prompt)."""
        return self.slot_bytes() * capacity

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        logc: Tensor,
        pos: Tensor,
        kv_pos: Tensor,
        sink: int,
        recent: int,
        return_mass: bool,
    ) -> tuple[Tensor, Tensor]:
        """``kvslim::attend`` over the rows and the step's new tokens (its shapes; ``k`` as
        stored: before RoPE where the storage keeps keys so)."""
        s = self.site
        return torch.ops.kvslim.attend(
            q, self.rotated_new(k, kv_pos), v, self.rotated(self.keys(), pos), self.values(), logc,
            pos, kv_pos, s.scale, s.window, sink, recent, return_mass,
        )  # fmt: skip

    def attend_latent(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        latents: tuple[Tensor, Tensor],
        bases: tuple[Tensor, Tensor],
        dense: tuple[Tensor, Tensor],
        logc: Tensor,
        pos: Tensor,
        kv_pos: Tensor,
        sink: int,
        recent: int,
        return_mass: bool,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`attend` through ``kvslim::attend_latent``, for a storage whose first rows are
        latents ``(c_K, c_V)`` ``[B, 1, C_lat, r]`` with ``bases`` ``[(B,) H_kv·D, r]`` and whose
        other rows are ``dense`` ``[B, H_kv, R − C_lat, D]`` (keys before RoPE)."""
        s, rope = self.site, self.rope if self.rotates_at_read else None
        inv_freq = None if rope is None else rope.inv_freq.to(q.device)
        return torch.ops.kvslim.attend_latent(
            q, self.rotated_new(k, kv_pos), v, *latents, *bases, *dense, logc, pos, kv_pos, s.scale,
            s.window, sink, recent, return_mass, inv_freq, 0 if rope is None else rope.rotary_dim,
            1.0 if rope is None else rope.attention_scaling,
        )  # fmt: skip

    def window_mass(
        self, q: Tensor, q_pos: Tensor, logc: Tensor, pos: Tensor, capacity: int
    ) -> tuple[Tensor, Tensor]:
        """The attention of cached queries ``q [B, H_q, W, D]`` over the first ``capacity`` rows
        (:func:`~kvslim_fx.kernels.attention.window_mass`)."""
        s = self.site
        keys = self.rotated(self.keys()[:, :, :capacity], pos)
        return window_mass(q, q_pos, keys, logc, pos, s.scale, s.window)

    def options(self) -> dict:
        """The options that rebuild this storage (recorded in exported packages)."""
        return {} if self.pre_rope == self.pre_rope_default else {"pre_rope": self.pre_rope}


STORAGES: dict[str, type[Storage]] = {}


KEY_SHARE = "the keys' part of the numbers kept per token"


def check_fraction(storage: str, name: str, value: object, *, closed: bool, meaning: str) -> float:
    """``value`` as a float in (0, 1] (``closed``) or (0, 1); else an error naming the storage,
    the option and what it means."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not (ok and value > 0 and (value <= 1 if closed else value < 1)):
        bounds = "(0, 1]" if closed else "(0, 1)"
        raise KVSlimError(f"{storage}: {name} must lie in {bounds} ({meaning}), got {value!r}")
    return float(value)


def register_storage(cls: type[Storage]) -> type[Storage]:
    """Class decorator: make ``storage="<cls.name>"`` available to ``transform`` (a later
    registration of the same name replaces the earlier)."""
    return register(STORAGES, cls, Storage, "register_storage")
