"""Tiny random-init Hugging Face causal LMs for tests.

Every model is built offline from a config (``AutoModelForCausalLM.from_config``): no weights
are downloaded. Each one is small (vocab 128, hidden 64, 2-3 layers, head_dim 16, 512 positions),
uses ``attn_implementation="sdpa"`` and is returned in ``eval()`` mode. Construction is seeded,
so ``tiny_model(arch, seed=s)`` is deterministic; the caller's global RNG state is left untouched.

What each architecture exercises:

* ``llama``, ``qwen3``, ``olmo2``: plain rotary attention with grouped-query attention (4 query
  heads, 2 key/value heads); qwen3 and olmo2 add q/k RMSNorms (per head / over the whole
  projection respectively).
* ``qwen2``: GQA, and layer 1 is a sliding-window layer (``layer_types``, window 20).
* ``mistral``: GQA, every layer uses a sliding window of 24.
* ``gemma3_text``: GQA, layers sliding / sliding / full with window 16, a different rope base per
  layer type, and an attention scale of ``query_pre_attn_scalar ** -0.5`` (not ``head_dim``).
* ``granite``: GQA with non-default ``attention_multiplier`` (the SDPA scale),
  ``embedding_multiplier``, ``residual_multiplier`` and ``logits_scaling``.
* ``gpt2``: learned absolute positions, no GQA, ``scale_attn_by_inverse_layer_idx=True`` (the
  SDPA scale of layer ``i`` is ``head_dim ** -0.5 / (i + 1)``).
* ``gpt_neox``: no GQA, partial rotary (25% of head_dim), parallel residual.
* ``phi3``: GQA, fused qkv projection, partial rotary (50% of head_dim).

HF sliding-window semantics (``transformers.masking_utils.sliding_window_overlay``): query ``i``
sees key ``j`` iff ``j <= i`` and ``i - j < sliding_window``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

ARCHS: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma3_text",
    "olmo2",
    "granite",
    "gpt2",
    "gpt_neox",
    "phi3",
)

VOCAB_SIZE = 128
HIDDEN_SIZE = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 16
MAX_POSITIONS = 512
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2

_SPECIAL_TOKENS: dict[str, int] = {
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}

# Llama-family defaults: GQA 4/2 heads, head_dim 16, 2 layers.
_DECODER_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": 2 * HIDDEN_SIZE,
    "num_hidden_layers": 2,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_KV_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    "tie_word_embeddings": False,
    **_SPECIAL_TOKENS,
}

_ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "llama": {**_DECODER_COMMON, "head_dim": HEAD_DIM},
    "qwen2": {
        **_DECODER_COMMON,
        # `use_sliding_window=False` would reset `sliding_window` to None in `__post_init__`.
        "use_sliding_window": True,
        "sliding_window": 20,
        "max_window_layers": 1,
        "layer_types": ["full_attention", "sliding_attention"],
    },
    "qwen3": {**_DECODER_COMMON, "head_dim": HEAD_DIM},
    "mistral": {**_DECODER_COMMON, "head_dim": HEAD_DIM, "sliding_window": 24},
    "gemma3_text": {
        **_DECODER_COMMON,
        "num_hidden_layers": 3,
        "head_dim": HEAD_DIM,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "sliding_window": 16,
        # SDPA scale = 32 ** -0.5, deliberately != head_dim ** -0.5.
        "query_pre_attn_scalar": 32,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    },
    "olmo2": dict(_DECODER_COMMON),
    "granite": {
        **_DECODER_COMMON,
        "attention_multiplier": 0.2,  # SDPA scale (head_dim ** -0.5 would be 0.25)
        "embedding_multiplier": 6.0,
        "residual_multiplier": 0.5,
        "logits_scaling": 4.0,
    },
    "gpt2": {
        "vocab_size": VOCAB_SIZE,
        "n_embd": HIDDEN_SIZE,
        "n_layer": 2,
        "n_head": NUM_HEADS,
        "n_positions": MAX_POSITIONS,
        "scale_attn_by_inverse_layer_idx": True,
        **_SPECIAL_TOKENS,
    },
    "gpt_neox": {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 2 * HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": NUM_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
        **_SPECIAL_TOKENS,
    },
    "phi3": {
        **_DECODER_COMMON,
        "partial_rotary_factor": 0.5,
        "sliding_window": None,
    },
}


def tiny_config(arch: str, **overrides: Any) -> PretrainedConfig:
    """Return the tiny config for ``arch`` (one of :data:`ARCHS`), with SDPA attention.

    ``overrides`` replace config fields (e.g. ``max_position_embeddings=10_240`` for a test that
    generates past the usual 512 positions).
    """
    if arch not in _ARCH_KWARGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    kwargs = {key: list(v) if isinstance(v, list) else v for key, v in _ARCH_KWARGS[arch].items()}
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    config._attn_implementation = "sdpa"
    return config


def tiny_model(
    arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> PreTrainedModel:
    """Build the tiny random-init causal LM for ``arch`` in eval mode; ``overrides`` as in config.

    Initialisation is seeded with ``seed`` inside a forked RNG, so two calls with the same
    arguments give identical weights and the global RNG state is not changed.
    """
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = model.to(dtype=dtype)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.bos_token_id = BOS_TOKEN_ID
    model.generation_config.eos_token_id = EOS_TOKEN_ID
    return model.eval()
