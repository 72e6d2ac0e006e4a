"""The model :func:`kvslim_fx.transform` returns: HF-style calls over a cache that lives inside."""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from .budget import layer_budgets
from .cache import LayerCache
from .errors import KVSlimError
from .methods import Method
from .methods.base import non_negative, round_capacity


class KVSlimModel(nn.Module):
    """A causal LM whose attention layers keep their own bounded KV cache.

    ``model(input_ids, attention_mask)`` appends the tokens to the cache and returns their logits
    ``[B, L, vocab]``, like an HF model fed its ``past_key_values``; ``reset()`` empties the cache.
    Prompts longer than ``chunk_size`` are fed in chunks so memory stays bounded by the budget.

    ``prefill="full"`` (question-aware): the cache grows to hold the whole prompt, and
    :meth:`end_prompt` (which :func:`~kvslim_fx.generate` calls after the prompt) compresses it
    once to the budget, scored by the prompt's last ``prefill_window`` queries; decoding then
    holds the budget. ``"bounded"``: the cache never exceeds the budget (``end_prompt`` does
    nothing).
    """

    def __init__(
        self,
        graph: fx.GraphModule,
        method: Method,
        config,
        logits_index: int,
        chunk_size: int,
        prefill: str = "bounded",
        prefill_window: int = 64,
        budget_schedule: str | tuple[int, ...] = "uniform",
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.budget_schedule = budget_schedule
        self.graph = graph
        # Hidden states → logits, split off the graph (passes/head.py) so a step can keep only
        # its last positions' logits; without one the graph returns logits, sliced afterwards.
        self.head = head if head is not None else nn.Identity()
        self.method = method
        self.config = config
        self.logits_index = logits_index
        self.requested_chunk = chunk_size
        self.chunk_size = chunk_size
        self.prefill = prefill
        self.prefill_window = prefill_window
        # Set by reset(): each layer's slots, the chunk length decoding allows, and whether the
        # cache holds a whole prompt that end_prompt() has still to compress.
        self.layer_slots: list[int] = []
        self.decode_chunk = chunk_size
        self.prompt_pending = False
        self.peak_cache_bytes = 0
        self.max_positions = _max_positions(config)
        # generate()'s defaults, as HF takes them from the model's generation config.
        self.eos_token_id: int | list[int] | None = None
        self.pad_token_id: int | None = None
        # Token ids the input embedding can look up (its rows; None: unchecked).
        self.vocab_size: int | None = None
        # [B] real (non-pad) tokens seen so far per row = the next token's position.
        self.register_buffer("seen", torch.zeros(0, dtype=torch.long), persistent=False)
        # A plain tuple, not a ModuleList: the caches are already submodules of the graph.
        self.layers: tuple[LayerCache, ...] = tuple(
            m for m in graph.modules() if isinstance(m, LayerCache)
        )

    @property
    def device(self) -> torch.device:
        return next(self.graph.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        # Int8 linear weights are buffers; the embedding and the norms keep the model's dtype.
        return next(p.dtype for p in self.graph.parameters() if p.is_floating_point())

    def reset(
        self,
        batch_size: int | None = None,
        max_length: int | None = None,
        prompt_len: int | None = None,
    ) -> None:
        """Empty the cache for ``batch_size`` rows of up to ``max_length`` tokens.

        ``max_length`` sizes a ``full`` cache (default: the model's positions); ``prompt_len``
        resolves a fractional budget and, with ``prefill="full"``, sizes the cache that holds the
        prompt (default: ``max_length``). Buffers are reused when their shape does not change,
        so a compiled model does not recompile across calls of the same shape.
        """
        batch_size = batch_size or max(int(self.seen.shape[0]), 1)
        max_length = max_length or self.max_positions
        if max_length > self.max_positions:
            raise KVSlimError(
                f"max_length={max_length} exceeds the model's {self.max_positions} positions; "
                "shorten the prompt or generate fewer tokens"
            )
        slots = self.method.slots(prompt_len or max_length, max_length)
        if self.method.budget is not None:
            floor = self.method.floor(slots)
            per_layer = layer_budgets(slots, len(self.layers), self.budget_schedule, floor)
        else:
            per_layer = [slots] * len(self.layers)
        # A cache that holds the whole sequence never compresses, so its chunks need no limit.
        fits = all(max_length <= n for n in per_layer)
        limit = None
        for layer, n in enumerate(per_layer):
            if max_length > n:
                self.method.check_layer_budget(n, layer)
                cap = self.method.max_chunk(n)
                if cap is not None and cap < 1:
                    where = (
                        f" (layer {layer}'s share of the budget)" if len(set(per_layer)) > 1 else ""
                    )
                    raise KVSlimError(
                        f"{self.method.name}: a budget of {n} slots{where} leaves no room to "
                        "compress; raise the budget or lower sink/recent"
                    )
                limit = cap if limit is None or cap is None else min(limit, cap)
        # A merging cache frees at most `limit` slots per step: longer chunks are split.
        self.decode_chunk = min(self.requested_chunk, limit or self.requested_chunk)
        self.layer_slots = per_layer
        self.prompt_pending = self.prefill == "full" and not fits
        held, observe = per_layer, 0
        if self.prompt_pending:
            held = [max(n, round_capacity(prompt_len or max_length)) for n in per_layer]
            # Keep only the prompt's last queries that the method's rule reads.
            observe = min(self.prefill_window, self.method.observe or self.prefill_window)
        self.chunk_size = self.requested_chunk if self.prompt_pending else self.decode_chunk
        for layer, n in zip(self.layers, held, strict=True):
            layer.allocate(batch_size, n, self.dtype, self.device, observe)
        # The most the cache holds: the prompt's slots in "full" mode, else the budget's.
        self.peak_cache_bytes = self.cache_bytes()
        if self.seen.shape != (batch_size,):
            self.seen = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.seen.zero_()

    def end_prompt(self) -> None:
        """After the prompt (:func:`~kvslim_fx.generate` calls it; a decode loop of one's own
        calls it after the prompt's last chunk). A ``prefill="full"`` prompt: compress every
        layer's cache to the budget, once, scored by the prompt's last queries; from here each
        layer holds the budget (a no-op in ``"bounded"`` mode or when the cache already holds
        the whole sequence). Then each storage's prompt-end hook
        (:meth:`~kvslim_fx.storage.Storage.end_prompt`). Runs eagerly: call it on the model, not
        inside a compiled region."""
        with torch.no_grad():
            if self.prompt_pending:
                for layer, slots in zip(self.layers, self.layer_slots, strict=True):
                    layer.end_prompt(slots)
                self.chunk_size = self.decode_chunk
                self.prompt_pending = False
            for layer in self.layers:
                layer.storage.end_prompt(layer.pos)

    def calibrate(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> None:
        """Fit what the storages learn from data on ``input_ids [B, L]`` (one eager pass, then
        each storage fits; :meth:`~kvslim_fx.storage.Storage.begin_calibration`). ``lorc``: each
        layer's bases become the principal directions of the keys and values the model
        produced on this text (PCA of the rows, uncentred), at the ranks the schedule gave,
        instead of the weights' singular vectors. Call before ``torch.compile`` or export (the
        bases are the model's constants); the cache is reset."""
        storages = [layer.storage for layer in self.layers]
        with torch.no_grad():
            for s in storages:
                s.begin_calibration()
            try:
                self.reset(batch_size=input_ids.shape[0], prompt_len=input_ids.shape[1])
                self(input_ids, attention_mask)
            except BaseException:
                for s in storages:
                    s.end_calibration(fit=False)
                raise
            for s in storages:
                s.end_calibration()
            self.reset()

    def state(self) -> dict[str, tuple[Tensor, float]]:
        """Mutable decoding state by buffer name, with each buffer's value when empty."""
        fills = {id(self.seen): 0}
        for layer in self.layers:
            fills |= {id(getattr(layer, n)): fill for n, (_, fill) in layer.slot_state.items()}
            fills |= {id(buf): 0 for buf in layer.buffers() if id(buf) not in fills}
        return {n: (b, fills[id(b)]) for n, b in self.named_buffers() if id(b) in fills}

    def diagnostics(self) -> list[dict[str, float]]:
        """Per layer, what would reveal a degenerate cache: occupancy, the largest slots and the
        merge counts (:meth:`~kvslim_fx.cache.LayerCache.diagnostics`). Reads the device."""
        return [layer.diagnostics() for layer in self.layers]

    def cache_bytes(self) -> int:
        """Bytes of K/V (and per-slot metadata) the cache holds at its capacity, and the state
        groups of layers share, once."""
        shared = {id(m): m for layer in self.layers if (m := layer.storage.shared) is not None}
        group_bytes = sum(b.numel() * b.element_size() for m in shared.values()
                          for b in m.buffers())  # fmt: skip
        return sum(layer.nbytes() for layer in self.layers) + group_bytes

    def full_cache_bytes(self, seq_len: int) -> int:
        """Bytes an uncompressed K/V cache (HF's dynamic cache) needs for ``seq_len`` tokens."""
        batch = max(int(self.seen.shape[0]), 1)
        elem = torch.empty(0, dtype=self.dtype).element_size()
        total = 0
        for layer in self.layers:
            s = layer.site
            tokens = min(seq_len, s.window) if s.window else seq_len
            total += 2 * batch * s.num_kv_heads * s.head_dim * tokens * elem
        return total

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, logits_to_keep: int = 0
    ) -> Tensor:
        """``input_ids [B, L]``, ``attention_mask [B, L]`` or ``[B, past + L]`` → ``[B, L, V]``;
        with ``logits_to_keep = n > 0`` (HF's argument) only the last ``n`` positions' logits,
        ``[B, n, V]``, and the head runs on those only (``generate`` reads a prompt so)."""
        if not torch.compiler.is_compiling():
            check_shapes(input_ids, attention_mask)
            non_negative("logits_to_keep", logits_to_keep)
        L = input_ids.shape[1]
        valid = _new_token_mask(input_ids, attention_mask)
        if not torch.compiler.is_compiling():
            self._check(input_ids, valid)
        if self.chunk_size >= L:
            return self.step(input_ids, valid, logits_to_keep)
        logits = []
        first_kept = L - logits_to_keep if 0 < logits_to_keep < L else 0
        for i in range(0, L, self.chunk_size):
            end = min(i + self.chunk_size, L)
            # The chunk's positions at or after the first kept one; none: its last, dropped.
            keep = end - max(i, first_kept)
            out = self.step(
                input_ids[:, i:end], valid[:, i:end], 0 if keep >= end - i else max(keep, 1)
            )
            if keep > 0:
                logits.append(out)
        return torch.cat(logits, dim=1)

    def step(self, input_ids: Tensor, valid: Tensor, logits_to_keep: int = 0) -> Tensor:
        """One chunk, no checks: the body that ``torch.compile`` and AOTInductor see."""
        pos = self.seen[:, None] + valid.long().cumsum(dim=1) - 1
        kv_pos = torch.where(valid, pos, -1)
        # HF gives padding position 0; only real tokens' positions matter.
        rope_pos = torch.where(valid, pos, 0)
        out = self.graph(input_ids, rope_pos, kv_pos)
        self.seen.add_(valid.sum(dim=1))
        hidden = out[self.logits_index]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.head(hidden)

    def _check(self, input_ids: Tensor, valid: Tensor) -> None:
        if input_ids.dtype not in (torch.long, torch.int32):
            raise KVSlimError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
        if input_ids.device != self.device:
            raise KVSlimError(
                f"input_ids are on {input_ids.device} but the model is on {self.device}; "
                f"move them with input_ids.to('{self.device}')"
            )
        check_vocab(input_ids, self.vocab_size)
        B = input_ids.shape[0]
        if self.seen.shape != (B,) or self.layers[0].layout is None:
            if self.seen.numel() and int(self.seen.max()) > 0:
                raise KVSlimError(
                    f"batch size changed from {self.seen.shape[0]} to {B} mid-sequence; "
                    "call model.reset() first"
                )
            self.reset(batch_size=B, prompt_len=input_ids.shape[1])
        end = int((self.seen + valid.sum(dim=1)).max())
        if end > self.max_positions:
            raise KVSlimError(
                f"the sequence would reach {end} tokens but the model has "
                f"{self.max_positions} positions; shorten the prompt or generate fewer tokens"
            )
        for layer in self.layers:
            if not layer.layout.wraps and end > layer.capacity:
                raise KVSlimError(
                    f"the cache holds {layer.capacity} tokens and the sequence would reach {end}; "
                    f"call model.reset(max_length=...) with a larger max_length"
                )


def check_shapes(input_ids, attention_mask) -> None:
    """``input_ids [B, L]`` with at least one token; ``attention_mask [B, L]`` or ``[B, past + L]``.

    Host-side: the model runs it in eager mode only, the package runner and ``generate`` always.
    """
    if not isinstance(input_ids, Tensor):
        raise KVSlimError(
            f"input_ids must be a [batch, length] tensor of token ids, got a "
            f"{type(input_ids).__name__}; build it with torch.tensor([ids])"
        )
    if input_ids.dim() != 2:
        hint = "; add the batch dimension: input_ids[None]" if input_ids.dim() == 1 else ""
        raise KVSlimError(
            "input_ids must be a [batch, length] tensor of token ids, got shape "
            f"{tuple(input_ids.shape)}{hint}"
        )
    if input_ids.shape[1] == 0:
        raise KVSlimError(
            f"the prompt is empty (input_ids of shape {tuple(input_ids.shape)}): "
            "pass at least one token"
        )
    if input_ids.shape[0] == 0:
        raise KVSlimError(
            f"input_ids has no rows (shape {tuple(input_ids.shape)}): pass at least one prompt"
        )
    if attention_mask is None:
        return
    B, L = input_ids.shape
    if not isinstance(attention_mask, Tensor):
        raise KVSlimError(
            f"attention_mask must be a tensor (1 = token, 0 = padding), got a "
            f"{type(attention_mask).__name__}"
        )
    shape = tuple(attention_mask.shape)
    if len(shape) != 2 or shape[0] != B or shape[1] < L:
        raise KVSlimError(
            f"attention_mask has shape {shape} but input_ids {(B, L)}: pass the mask of the "
            "whole sequence [batch, past + length] or of the new tokens [batch, length]"
        )


def check_vocab(input_ids: Tensor, vocab_size: int | None) -> None:
    """Every token id must index the input embedding (``vocab_size`` rows; None: unchecked).

    Ids of another dtype or on the meta device are left to the dtype and device checks.
    """
    if vocab_size is None or input_ids.is_meta or input_ids.dtype not in (torch.long, torch.int32):
        return
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()  # one host sync
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        hint = (
            "; padding needs a real token id (e.g. the pad token), masked out by attention_mask"
            if bad < 0
            else "; encode the prompt with this model's tokenizer"
        )
        raise KVSlimError(
            f"token id {bad} is outside the model's vocabulary (ids 0..{vocab_size - 1}){hint}"
        )


def _new_token_mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0]:
        raise KVSlimError(
            f"attention_mask must be [batch, length], got {tuple(attention_mask.shape)} "
            f"for input_ids {tuple(input_ids.shape)}"
        )
    return attention_mask[:, -input_ids.shape[1] :].bool()


def _max_positions(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise KVSlimError(f"{config.model_type}: the config names no maximum number of positions")
