"""``lorc`` (LoRC, Zhang et al. 2024): keys and values as low-rank latents of the projections.

A layer's keys (before RoPE) are ``k = [x, 1] M_K`` with ``M_K = [W_Kᵀ; b_Kᵀ]`` ``[d_in + 1,
H_kv·D]`` (all KV heads stacked, the bias as a last row against a constant input), values
likewise. With the SVD ``M = U Σ Vᵀ`` and ``V_r`` its first ``r`` right singular vectors
``[H_kv·D, r]``, the cache keeps per token the latent ``c = k V_r`` (``r`` numbers for all KV heads)
and attention reads ``k̂ = c V_rᵀ = [x, 1] M_r``, where ``M_r`` is the best rank-``r``
approximation of ``M`` (Eckart–Young): LoRC's ``x A_K`` with ``A_K = U_r Σ_r`` and ``B_K = V_rᵀ``.
The latent is computed from the key the model already produced, so the projection weights stay
as they are (at decode one token's ``x W_K`` is what every cache pays; the saving is memory).
Attention reads through ``kvslim::attend_latent`` (every slot a latent): keys are rebuilt before
RoPE and rotated to their positions (RoPE sits between the key and the query, so ``B_K`` cannot be
folded into the query projection); values stay latent: the probabilities weight the latents and
``B_V`` maps the sum to each head. That is LoRC's absorption of ``B_V`` into the output projection,
applied before ``o_proj`` instead of folded into it: with one latent for all KV heads a folded
``o_proj`` would take ``H_q · r_V`` inputs instead of ``H_q · D`` (SmolLM2 at ratio 0.5: 864 instead
of 576), more weight to read per decode step, while ``(Σ p c) B_V`` costs ``H_q · r_V · D`` per
query.

Ranks per layer (``schedule``): ``"uniform"`` gives every layer ``round(ratio · H_kv·D)``;
``"progressive"`` (the default) gives shallow layers more, by the cumulative condition numbers
from the deepest layer up (``C_l = Σ_{j ≥ l} log κ_j``, ``κ = σ_max / σ_min`` of ``M``; an
error in a shallow layer passes through every later one): ranks proportional to
``1 + (C_l − min C) / (max C − min C)``, keys and values each, with the same total as uniform.
LoRC's exact formula is unpublished; this is the rule its abstract describes. ``key_share``
splits the ``2 · ratio · H_kv·D`` numbers a layer keeps per token between keys and values
(0.5: half each, LoRC's setting; each capped at the full width).

``KVSlimModel.calibrate`` replaces the weights' singular vectors by the principal directions of
the keys and values the model produces on a text (uncentred PCA of the rows, at the same ranks):
the tokens a model sees occupy a small part of the input space, which the weights' SVD treats
as uniform.

Models that normalise keys per head after the projection (Gemma3, Qwen3, OLMo2) get the basis of
the projection before the norm: exact at full rank, an approximation below it
(``site.key_proj.exact`` is False).

Latents are shared by the KV heads, so a policy must keep or drop the same slots in every KV
head and never combine rows with per-head weights: ``full``, ``streaming`` and the score methods
with ``per_head=False`` compose; ``kvslimmer`` and ``weightedkv`` are refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import KVSlimError
from ..kernels.attention import latent_rows
from ..kernels.slots import gather_slots, slot_index
from .base import KEY_SHARE, Storage, check_fraction, register_storage

SCHEDULES = ("progressive", "uniform")


def allocate_ranks(weights: list[float], total: int, caps: list[int]) -> list[int]:
    """Integer ranks proportional to ``weights`` summing to ``total`` (at most ``sum(caps)``),
    each in ``[1, cap]``: what a capped layer cannot take goes to the others, in proportion."""
    n = len(weights)
    total = min(max(total, n), sum(caps))
    share = [0.0] * n
    free = list(range(n))
    left = float(total)
    while free:
        scale = left / sum(weights[i] for i in free)
        over = [i for i in free if weights[i] * scale >= caps[i]]
        if not over:
            for i in free:
                share[i] = weights[i] * scale
            break
        for i in over:
            share[i] = caps[i]
            left -= caps[i]
            free.remove(i)
    ranks = [min(caps[i], max(1, math.floor(share[i]))) for i in range(n)]
    # Largest remainders first, within the caps, until the total is met.
    for i in sorted(range(n), key=lambda i: share[i] - math.floor(share[i]), reverse=True):
        if sum(ranks) >= total:
            break
        if ranks[i] < caps[i]:
            ranks[i] += 1
    return ranks


def progressive_weights(conditions: list[float]) -> list[float]:
    """``1 + s_l`` with ``s_l`` the cumulative log condition number from the deepest layer up to
    layer ``l``, scaled to ``[0, 1]``: the shallowest layers weigh up to twice the deepest."""
    cumulative = [sum(math.log(k) for k in conditions[i:]) for i in range(len(conditions))]
    low, high = min(cumulative), max(cumulative)
    if high - low <= 0:
        return [1.0] * len(conditions)
    return [1 + (c - low) / (high - low) for c in cumulative]


@register_storage
class LoRC(Storage):
    """Latents ``ck [B, 1, R, r_k]``, ``cv [B, 1, R, r_v]`` and the bases ``[H_kv·D, r]`` that
    rebuild K and V; see the module docstring."""

    name = "lorc"
    pre_rope_default = True
    needs_projections = True

    def __init__(self, site, rope=None, ratio: float = 0.5, schedule: str = "progressive",
                 key_share: float = 0.5, **base) -> None:  # fmt: skip
        super().__init__(site, rope, **base)
        if not self.pre_rope:
            raise KVSlimError("lorc: keys are kept before RoPE (the basis spans un-rotated keys); "
                              "drop pre_rope=false")  # fmt: skip
        ratio = check_fraction("lorc", "ratio", ratio, closed=True,
                               meaning="the kept fraction of the K/V width")  # fmt: skip
        if schedule not in SCHEDULES:
            raise KVSlimError(f"lorc: schedule must be one of {', '.join(SCHEDULES)}, "
                              f"got {schedule!r}")  # fmt: skip
        key_share = check_fraction("lorc", "key_share", key_share, closed=False, meaning=KEY_SHARE)
        self.ratio, self.schedule, self.key_share = ratio, schedule, key_share
        self.width = site.num_kv_heads * site.head_dim
        # Singular values and right singular vectors of each map (float64), kept until the
        # ranks are known (finish_layers).
        self._svd = {}
        for name, proj in (("k", site.key_proj), ("v", site.value_proj)):
            if proj is None:
                raise KVSlimError("lorc needs the layer's projections (transform provides them)")
            _, sigma, vh = torch.linalg.svd(proj.augmented(), full_matrices=False)
            self._svd[name] = (sigma, vh)
        # Tokens the bases were fitted on (KVSlimModel.calibrate); 0: from the weights.
        self.calibration_tokens = 0
        self._gram: dict[str, Tensor] | None = None
        self.basis_k = nn.Parameter(torch.empty(0), requires_grad=False)
        self.basis_v = nn.Parameter(torch.empty(0), requires_grad=False)
        self.register_buffer("ck", torch.empty(0), persistent=False)
        self.register_buffer("cv", torch.empty(0), persistent=False)

    @classmethod
    def check_method(cls, method) -> None:
        if method.combines_rows:
            raise KVSlimError(
                f"storage 'lorc' cannot carry method {method.name!r}: it combines rows with "
                "weights per KV head, and lorc keeps one latent per token for all KV heads; "
                "use full, streaming or a score method with per_head=False"
            )
        if getattr(method, "per_head", False):
            raise KVSlimError(
                f"storage 'lorc' cannot carry method {method.name!r} with per_head=True: lorc "
                "keeps one latent per token for all KV heads, so every head must keep the same "
                f"slots; pass per_head=False to {method.name}"
            )

    @classmethod
    def finish_layers(cls, storages: list[LoRC]) -> None:
        kept = [round(2 * s.ratio * s.width) for s in storages]  # numbers per token, K and V
        keys = [round(n * s.key_share) for n, s in zip(kept, storages, strict=True)]
        totals = {"k": sum(keys), "v": sum(kept) - sum(keys)}
        for name in ("k", "v"):
            caps = [len(s._svd[name][0]) for s in storages]
            total = totals[name]
            if storages[0].schedule == "uniform":
                weights = [1.0] * len(storages)
            else:
                sigmas = [s._svd[name][0] for s in storages]
                weights = progressive_weights(
                    [float(sg[0] / sg[-1].clamp_min(sg[0] * 1e-12)) for sg in sigmas]
                )
            for s, rank in zip(storages, allocate_ranks(weights, total, caps), strict=True):
                basis = s._svd[name][1][:rank].T.float()  # [H_kv·D, r]
                getattr(s, f"basis_{name}").data = basis.to(s.site.key_proj.weight.device)
        for s in storages:
            s._svd = {}

    def begin_calibration(self) -> None:
        # Identity bases of the full width while recording: the latents are the rows, so the
        # pass sees the model's own activations, not those of the ranks being fitted.
        # The bases to restore if the pass fails; their widths are the ranks to fit.
        self._before = {"k": self.basis_k.data, "v": self.basis_v.data}
        eye = torch.eye(self.width, device=self.basis_k.device)
        self.basis_k.data, self.basis_v.data = eye, eye.clone()
        self._gram = {n: torch.zeros(self.width, self.width, dtype=torch.float64,
                                     device=eye.device) for n in "kv"}  # fmt: skip
        self._tokens = 0

    def _record(self, k: Tensor, v: Tensor, kv_pos: Tensor) -> None:
        """Add a step's real tokens (``kv_pos >= 0``) to the Gram matrices ``Σ rowᵀ row``
        ``[H_kv·D, H_kv·D]`` (float64)."""
        real = (kv_pos >= 0).reshape(-1)
        for name, rows in (("k", k), ("v", v)):
            B, H, L, D = rows.shape
            flat = rows.transpose(1, 2).reshape(B * L, H * D)[real].double()
            self._gram[name] += flat.T @ flat
        self._tokens += int(real.sum())

    def end_calibration(self, fit: bool = True) -> None:
        """``fit``: each basis becomes the leading eigenvectors of its Gram matrix, at the rank
        the schedule gave (the rank-``r`` subspace with the least squared error over the
        recorded rows); else the bases from before."""
        for name, before in self._before.items():
            basis = before
            if fit:
                _, vectors = torch.linalg.eigh(self._gram[name])  # ascending eigenvalues
                basis = vectors[:, -before.shape[-1] :].flip(-1).float()
            getattr(self, f"basis_{name}").data = basis
        if fit:
            self.calibration_tokens = self._tokens
        self._gram = None

    @property
    def rank_k(self) -> int:
        return self.basis_k.shape[-1]

    @property
    def rank_v(self) -> int:
        return self.basis_v.shape[-1]

    def diagnostics(self) -> dict[str, float]:
        return {"rank_k": self.rank_k, "rank_v": self.rank_v,
                "calibration_tokens": self.calibration_tokens}  # fmt: skip

    def extra_repr(self) -> str:
        source = f"{self.calibration_tokens} calibration tokens" if self.calibration_tokens \
            else "the weights"  # fmt: skip
        return f"rank_k={self.rank_k}, rank_v={self.rank_v} of {self.width}, bases from {source}"

    def allocate(self, batch: int, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        for name, rank in (("ck", self.rank_k), ("cv", self.rank_v)):
            old, shape = getattr(self, name), (batch, 1, rows, rank)
            if old.shape != shape or old.dtype != dtype or old.device != device:
                setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))
            else:
                old.zero_()

    def _rebuilt(self, latent: Tensor, basis: Tensor) -> Tensor:
        """``[B, 1, N, r]`` latents → ``[B, H_kv, N, D]`` rows in the latents' dtype."""
        return latent_rows(latent, basis, self.site.num_kv_heads).to(latent.dtype)

    def _latent(self, rows: Tensor, basis: Tensor, dtype: torch.dtype) -> Tensor:
        """``[B, H_kv, M, D]`` rows → ``[B, 1, M, r]`` latents."""
        B, H, M, D = rows.shape
        flat = rows.transpose(1, 2).reshape(B, M, H * D).float()
        return (flat @ basis)[:, None].to(dtype)

    def keys(self) -> Tensor:
        return self._rebuilt(self.ck, self.basis_k)

    def values(self) -> Tensor:
        return self._rebuilt(self.cv, self.basis_v)

    def rows(self, slot: Tensor) -> tuple[Tensor, Tensor]:
        one = slot[:, :1]
        return (self._rebuilt(gather_slots(self.ck, one), self.basis_k),
                self._rebuilt(gather_slots(self.cv, one), self.basis_v))  # fmt: skip

    def write(self, slot: Tensor, k: Tensor | None, v: Tensor | None) -> None:
        # Every KV head holds the same slots (check_method): head 0's indices place the latent.
        index = slot_index(slot[:, :1])
        if k is not None:
            self.ck.index_put_(index, self._latent(k, self.basis_k, self.ck.dtype))
        if v is not None:
            self.cv.index_put_(index, self._latent(v, self.basis_v, self.cv.dtype))

    def move(self, src: Tensor, dst: Tensor) -> None:
        index = slot_index(dst[:, :1])
        for buf in (self.ck, self.cv):
            buf.index_put_(index, gather_slots(buf, src[:, :1]))

    def take(self, source: Tensor, keep: Tensor) -> None:
        source, keep = source[:, :1], keep[:, :1]
        for name in ("ck", "cv"):
            kept = torch.where(keep[..., None], gather_slots(getattr(self, name), source), 0)
            setattr(self, name, torch.cat([kept, torch.zeros_like(kept[:, :, :1])], dim=2))

    def attend(self, q, k, v, logc, pos, kv_pos, sink, recent, return_mass):
        if self._gram is not None:
            self._record(k, v, kv_pos)
        no_rows = k.new_zeros(*k.shape[:2], 0, k.shape[3])
        return self.attend_latent(q, k, v, (self.ck, self.cv), (self.basis_k, self.basis_v),
                                  (no_rows, no_rows), logc, pos, kv_pos, sink, recent,
                                  return_mass)  # fmt: skip

    def slot_bytes(self) -> int:
        return sum(t[:, :, :1].numel() * t.element_size() for t in (self.ck, self.cv))

    def options(self) -> dict:
        return {**super().options(), "ratio": self.ratio, "schedule": self.schedule,
                "key_share": self.key_share}  # fmt: skip
