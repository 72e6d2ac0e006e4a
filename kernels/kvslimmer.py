r"""KVSlimmer merge math: PyTorch reference twins (pure, vectorised, batched over leading dims).

Notation (``docs/algorithms.md`` §0-§1). A cache slot ``j`` holds a post-RoPE key ``k_j``, a
*mean* value ``m_j`` and a cardinality ``c_j`` (the value *sum* is ``V_j = c_j m_j``). With
query-key logits ``s_j = q·k_j / √d`` the cardinality-aware (LMA) attention is

    α_j = softmax(s + log c)_j        (slot probability mass; already includes c_j)
    o   = Σ_j α_j m_j  =  Σ_j e^{s_j} V_j / Σ_j c_j e^{s_j}

**Exact derivatives of the output w.r.t. the logits** (vectors in value space)::

    ∂o/∂s_i        =  α_i (v_i − o)
    ∂²o/∂s_i²      =  α_i (1 − 2α_i)(v_i − o)            =:  c_ii
    ∂²o/∂s_i ∂s_j  = −α_i α_j (v_i + v_j − 2o),  i ≠ j    =: −c_ij

Here ``v_i`` must be the slot's **mean** value ``m_i`` and ``o`` the attention output for these
to be the exact Hessian of the LMA output (the ``log c`` bias is a constant shift of the logit).
The released KVSlimmer code instead plugs in value *sums* ``V_i`` and ``o' = Σ α_j V_j``, which
coincide with the exact quantities only when every ``c_j = 1``. The functions below take whichever
``values`` / ``out`` the caller passes; see :func:`attention_output_hessian`.

**Scalar Hessian proxies** (one scalar per slot / per adjacent pair)::

    h_jj = α_j (1 − 2α_j) ‖v_j − o‖₂                  (signed; < 0 iff α_j > 1/2)
    h_12 = α_m α_n ‖v_m + v_n − 2o‖₂  ≥ 0              (exact norm of c_mn)
    h_12 ≤ α_m α_n (‖v_m − o‖ + ‖v_n − o‖)             (triangle bound; what the released code uses)

The paper uses L2 norms; the released code uses L1 norms of ``v − o`` and the triangle bound for
``h_12``. ``p=1`` and :func:`pair_coupling_bound` reproduce that.

**Closed-form merged key.** Merging slots ``m, n`` into ``k`` costs (second-order, off-diagonal
entering with a minus sign because ``∂²o/∂s_m∂s_n = −c_mn``)::

    E(k) = h11‖k − k_m‖² − 2 h12 ⟨k − k_m, k − k_n⟩ + h22‖k − k_n‖²
    A = h11 − h12,  B = h22 − h12,   k* = (A k_m + B k_n)/(A + B) = a k_m + b k_n,  a + b = 1

``E`` has the ``k``-Hessian ``2(A + B)·I``; we accept ``k*`` only when the 2×2 form
``[[h11, −h12], [−h12, h22]]`` is positive definite (``h11 > 0`` and ``h11 h22 > h12²``, which
implies ``A + B > 0``) and ``A + B`` is not negligible. Otherwise the weights fall back to the
attention masses, ``a = mass_m/(mass_m + mass_n)`` (``1/2`` if both are 0).

**Slot update**::

    V* = V_m + V_n,  c* = c_m + c_n   ⇒  m* = (c_m m_m + c_n m_n)/(c_m + c_n)
    h* = a² h_m + b² h_n

**RoPE** (HF ``rotate_half`` layout by default: channel ``i`` pairs with ``i + r/2`` for the first
``r = rotary_dim`` channels; the rest pass through)::

    R(δ) x:  (x_i, x_{i+r/2}) ↦ (x_i cos θ_i − x_{i+r/2} sin θ_i,  x_{i+r/2} cos θ_i + x_i sin θ_i),
             θ_i = δ · inv_freq_i;           R(a) R(b) = R(a + b),  R(−a) = R(a)⁻¹

Keys stored post-RoPE merge in the rotated frame (the merged slot takes position ``p_n``)::

    R(p_n) (a k_m + b k_n)  =  a R(p_n − p_m)[R(p_m) k_m] + b [R(p_n) k_n]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "adjacent_pair_coupling",
    "attention_output_hessian",
    "deviation_norm",
    "hessian_proxy",
    "merge_hessian",
    "merge_keys",
    "merge_post_rope",
    "merge_values",
    "merge_values_logc",
    "merge_weights",
    "pair_coupling",
    "pair_coupling_bound",
    "rope_rotate",
]


# --------------------------------------------------------------------------------------------
# Derivatives of the attention output w.r.t. the logits
# --------------------------------------------------------------------------------------------


def attention_output_hessian(alpha: Tensor, values: Tensor, out: Tensor) -> Tensor:
    """Full Hessian ``∂²o/∂s_i∂s_j`` of ``o(s) = Σ_j softmax(s + log c)_j v_j`` (vector form).

    ``H[.., i, j, :] = −α_i α_j (v_i + v_j − 2o) + δ_ij α_i (v_i − o)``, i.e. the diagonal is
    ``α_i (1 − 2α_i)(v_i − o)``. Exact when ``values`` are the slots' mean values and ``out`` is
    ``Σ_j α_j v_j``. ``O(T²·D)`` memory: a documented reference for tests, not for production.

    Args:
        alpha: ``[.., T]`` slot probabilities (softmax of the ``log c``-biased logits).
        values: ``[.., T, D]`` slot (mean) values.
        out: ``[.., D]`` attention output.
    Returns:
        ``[.., T, T, D]``.
    """
    dev = values - out.unsqueeze(-2)  # [.., T, D]
    aa = (alpha.unsqueeze(-1) * alpha.unsqueeze(-2)).unsqueeze(-1)  # [.., T, T, 1]
    hess = -aa * (dev.unsqueeze(-2) + dev.unsqueeze(-3))
    diag = alpha.unsqueeze(-1) * dev  # [.., T, D]
    eye = torch.eye(alpha.shape[-1], dtype=hess.dtype, device=hess.device).unsqueeze(-1)
    return hess + eye * diag.unsqueeze(-2)  # (i, j): δ_ij · diag_j


def deviation_norm(values: Tensor, out: Tensor, p: float = 2.0) -> Tensor:
    """``‖v_j − o‖_p`` per slot: ``values [.., T, D]``, ``out [.., D]`` → ``[.., T]``.

    ``p = 2`` follows the paper; the released KVSlimmer code uses ``p = 1``.
    """
    return torch.linalg.vector_norm(values - out.unsqueeze(-2), ord=p, dim=-1)


def hessian_proxy(alpha: Tensor, values: Tensor, out: Tensor, p: float = 2.0) -> Tensor:
    """Diagonal Hessian proxy ``h_jj = α_j (1 − 2α_j) ‖v_j − o‖_p`` (signed).

    This is ``±‖∂²o/∂s_j²‖`` (the sign of ``1 − 2α_j``). Pass mean values and the attention output
    for the exact layer-local Hessian; pass value sums and ``Σ α_j V_j`` to mirror the released
    code (which additionally uses ``p = 1``).

    Args:
        alpha: ``[.., T]`` slot probabilities.
        values: ``[.., T, D]`` slot values.
        out: ``[.., D]``.
        p: norm order (2 = paper, 1 = released code).
    Returns:
        ``h [.., T]``.
    """
    return alpha * (1 - 2 * alpha) * deviation_norm(values, out, p)


def pair_coupling(
    alpha_m: Tensor,
    alpha_n: Tensor,
    values_m: Tensor,
    values_n: Tensor,
    out: Tensor,
    p: float = 2.0,
) -> Tensor:
    """Exact off-diagonal coupling ``h12 = α_m α_n ‖v_m + v_n − 2o‖_p ≥ 0`` for any slot pair.

    ``∂²o/∂s_m∂s_n = −α_m α_n (v_m + v_n − 2o)``: ``h12`` is the norm of that vector, and it enters
    the merge energy with a minus sign.

    Args:
        alpha_m, alpha_n: ``[..]``.
        values_m, values_n: ``[.., D]``.
        out: ``[.., D]``.
    Returns:
        ``[..]``.
    """
    vec = values_m + values_n - 2 * out
    return alpha_m * alpha_n * torch.linalg.vector_norm(vec, ord=p, dim=-1)


def adjacent_pair_coupling(alpha: Tensor, values: Tensor, out: Tensor, p: float = 2.0) -> Tensor:
    """:func:`pair_coupling` for every adjacent pair ``(j, j + 1)``.

    Args:
        alpha: ``[.., T]``; values: ``[.., T, D]``; out: ``[.., D]``.
    Returns:
        ``h12 [.., T − 1]``: entry ``j`` couples slots ``j`` and ``j + 1``.
    """
    o = out.unsqueeze(-2)
    return pair_coupling(
        alpha[..., :-1], alpha[..., 1:], values[..., :-1, :], values[..., 1:, :], o
    )


def pair_coupling_bound(alpha_m: Tensor, alpha_n: Tensor, dev_m: Tensor, dev_n: Tensor) -> Tensor:
    """Triangle-inequality upper bound ``α_m α_n (‖v_m − o‖ + ‖v_n − o‖) ≥ h12`` (released code).

    Tight only when ``v_m − o`` and ``v_n − o`` are parallel with the same direction. All
    arguments ``[..]`` (``dev_*`` from :func:`deviation_norm`); returns ``[..]``.
    """
    return alpha_m * alpha_n * (dev_m + dev_n)


# --------------------------------------------------------------------------------------------
# Merge weights and slot updates
# --------------------------------------------------------------------------------------------


def merge_weights(
    h11: Tensor,
    h22: Tensor,
    h12: Tensor,
    mass_m: Tensor,
    mass_n: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form key-merge weights ``k* = a k_m + b k_n`` (``a + b = 1``), with fallback.

    ``A = h11 − h12``, ``B = h22 − h12``, ``a = A/(A + B)``, ``b = B/(A + B)`` where the quadratic
    form is positive definite (``h11 > 0`` and ``h11·h22 > h12²``) and ``A + B > eps·(h11 + h22)``
    (``eps`` is *relative*, guarding against huge extrapolating weights). Elsewhere (including
    NaN inputs) ``a = mass_m/(mass_m + mass_n)``, ``b = mass_n/(mass_m + mass_n)``, or ``1/2``
    each when both masses are 0. ``a``/``b`` need not lie in ``[0, 1]`` in the convex case.

    Args:
        h11, h22: ``[..]`` diagonal proxies of the two slots (:func:`hessian_proxy`).
        h12: ``[..]`` coupling (:func:`pair_coupling`), non-negative.
        mass_m, mass_n: ``[..]`` attention masses of the two slots (fallback weights).
        eps: relative tolerance on ``A + B``.
    Returns:
        ``a [..]``, ``b [..]`` and the bool ``fallback [..]`` mask.
    """
    h11, h22, h12, mass_m, mass_n = torch.broadcast_tensors(h11, h22, h12, mass_m, mass_n)
    big_a = h11 - h12
    big_b = h22 - h12
    den = big_a + big_b
    convex = (h11 > 0) & (h11 * h22 > h12 * h12) & (den > eps * (h11.abs() + h22.abs()))
    safe_den = torch.where(convex, den, torch.ones_like(den))
    msum = mass_m + mass_n
    has_mass = msum > 0
    safe_msum = torch.where(has_mass, msum, torch.ones_like(msum))
    half = torch.full_like(msum, 0.5)
    a_mass = torch.where(has_mass, mass_m / safe_msum, half)
    b_mass = torch.where(has_mass, mass_n / safe_msum, half)
    a = torch.where(convex, big_a / safe_den, a_mass.to(den.dtype))
    b = torch.where(convex, big_b / safe_den, b_mass.to(den.dtype))
    return a, b, ~convex


def merge_keys(k_m: Tensor, k_n: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``k* = a k_m + b k_n``: keys ``[.., D]``, weights ``[..]`` → ``[.., D]`` (same frame)."""
    return a.unsqueeze(-1) * k_m + b.unsqueeze(-1) * k_n


def merge_values(mean_m: Tensor, c_m: Tensor, mean_n: Tensor, c_n: Tensor) -> tuple[Tensor, Tensor]:
    """Value sums and cardinalities add; the merged slot stores the mean.

    Args:
        mean_m, mean_n: ``[.., D]`` mean values; c_m, c_n: ``[..]`` cardinalities.
    Returns:
        ``mean* = (c_m m_m + c_n m_n)/(c_m + c_n)`` ``[.., D]`` (the plain average if both
        cardinalities are 0) and ``c* = c_m + c_n`` ``[..]``.
    """
    if not c_m.is_floating_point():
        c_m = c_m.to(mean_m.dtype)
    if not c_n.is_floating_point():
        c_n = c_n.to(mean_n.dtype)
    c = c_m + c_n
    pos = c > 0
    w_m = torch.where(pos, c_m / torch.where(pos, c, torch.ones_like(c)), torch.full_like(c, 0.5))
    w_n = torch.where(pos, c_n / torch.where(pos, c, torch.ones_like(c)), torch.full_like(c, 0.5))
    mean = w_m.unsqueeze(-1).to(mean_m.dtype) * mean_m + w_n.unsqueeze(-1).to(mean_n.dtype) * mean_n
    return mean, c


def merge_values_logc(
    mean_m: Tensor, logc_m: Tensor, mean_n: Tensor, logc_n: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`merge_values` for the cache's ``log c`` storage.

    ``logc* = logaddexp(logc_m, logc_n)``,
    ``mean* = σ(logc_m − logc_n) m_m + σ(logc_n − logc_m) m_n``. Shapes as in :func:`merge_values`.
    """
    logc = torch.logaddexp(logc_m, logc_n)
    w_m = torch.sigmoid(logc_m - logc_n).unsqueeze(-1).to(mean_m.dtype)
    w_n = torch.sigmoid(logc_n - logc_m).unsqueeze(-1).to(mean_n.dtype)
    return w_m * mean_m + w_n * mean_n, logc


def merge_hessian(h_m: Tensor, h_n: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Hessian proxy of the merged slot, ``a² h_m + b² h_n`` (all ``[..]``)."""
    return a * a * h_m + b * b * h_n


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


def rope_rotate(
    x: Tensor,
    delta: Tensor | int | float,
    inv_freq: Tensor | None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
) -> Tensor:
    """Rotate ``x`` by the RoPE angle ``delta · inv_freq`` (a pure rotation, no attention scaling).

    Non-interleaved (HF ``rotate_half``, Llama/NeoX): channel ``i`` pairs with ``i + r/2``;
    interleaved (GPT-J / Meta complex form): channel ``2i`` pairs with ``2i + 1``. Only the first
    ``r = rotary_dim`` channels rotate (partial rotary); the rest are returned unchanged. Angles
    are computed in ``promote(x.dtype, float32)`` exactly like HF for float32 inputs. HF rope types
    with ``attention_scaling != 1`` (YaRN, LongRoPE) scale cos/sin; that factor is *not* applied
    here, so rotating an already-embedded key by a position gap stays a pure rotation.

    Args:
        x: ``[.., D]``.
        delta: ``[..]`` (broadcastable to ``x.shape[:-1]``) integer or float positions/gaps,
            or a Python number.
        inv_freq: ``[r/2]`` inverse frequencies, or ``None`` for no RoPE (returns ``x``).
        rotary_dim: ``r`` (even, ``≤ D``); defaults to ``2 · len(inv_freq)``.
        interleaved: pair layout, see above.
    Returns:
        ``[.., D]`` in ``x.dtype``.
    """
    if inv_freq is None:
        return x
    half = inv_freq.shape[-1]
    r = 2 * half if rotary_dim is None else rotary_dim
    if r != 2 * half or r > x.shape[-1]:
        raise ValueError(
            f"rotary_dim={r} needs inv_freq of length {r // 2} (got {half}) "
            f"and rotary_dim <= D={x.shape[-1]}"
        )
    cdt = torch.promote_types(x.dtype, torch.float32)
    d = torch.as_tensor(delta, device=x.device).to(cdt)
    ang = d.unsqueeze(-1) * inv_freq.to(device=x.device, dtype=cdt)  # [.., r/2]
    cos, sin = ang.cos(), ang.sin()
    xr = x[..., :r].to(cdt)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    y = torch.stack((y1, y2), dim=-1).flatten(-2) if interleaved else torch.cat((y1, y2), dim=-1)
    y = y.to(x.dtype)
    if r == x.shape[-1]:
        return y
    return torch.cat((y, x[..., r:].expand(*y.shape[:-1], -1)), dim=-1)


def merge_post_rope(
    k_m_rot: Tensor,
    pos_m: Tensor,
    k_n_rot: Tensor,
    pos_n: Tensor,
    a: Tensor,
    b: Tensor,
    inv_freq: Tensor | None,
    rotary_dim: int | None = None,
    interleaved: bool = False,
) -> Tensor:
    """Merge two post-RoPE keys in the rotated frame; the merged slot takes position ``pos_n``.

    ``k*_rot = a R(pos_n − pos_m) k_m_rot + b k_n_rot`` ``= R(pos_n)(a k_m + b k_n)``. The gap is
    formed in the positions' own dtype (exact for int64) before conversion to an angle.

    Args:
        k_m_rot, k_n_rot: ``[.., D]`` post-RoPE keys (``k_m`` the earlier slot).
        pos_m, pos_n: ``[..]`` positions.
        a, b: ``[..]`` merge weights.
        inv_freq, rotary_dim, interleaved: as in :func:`rope_rotate` (``inv_freq=None``: no RoPE,
            plain :func:`merge_keys`).
    Returns:
        ``[.., D]``.
    """
    k_m_at_n = rope_rotate(k_m_rot, pos_n - pos_m, inv_freq, rotary_dim, interleaved)
    return merge_keys(k_m_at_n, k_n_rot, a, b)
