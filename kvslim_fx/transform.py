"""``transform``: trace an HF causal LM with ``torch.export`` and give its attention a cache."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .budget import check_schedule
from .cache import LayerCache
from .errors import KVSlimError
from .methods import make_method
from .methods.base import positive
from .model import KVSlimModel, _max_positions
from .passes.head import split_head
from .passes.int8_linear import int8_placeholders, quantize_linears
from .passes.rope import UnsupportedRope, rope_facts
from .passes.sdpa import GraphRewriteError, replace_sdpa
from .storage import make_storage

DEFAULT_CHUNK = 512
PREFILL_MODES = ("bounded", "full")
# transform()'s own keyword options (the rest of **options belong to the method); a benchmark's
# method spec (kvslimmer:prefill=full:recent=64) may carry either.
TRANSFORM_OPTIONS = (
    "chunk_size", "prefill", "prefill_window", "storage", "budget_schedule", "weights"
)  # fmt: skip
WEIGHTS = ("model", "int8")


def transform(
    model: nn.Module,
    method: str = "full",
    budget: int | float | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    prefill: str = "bounded",
    prefill_window: int = 64,
    storage: str = "dense",
    budget_schedule: str | list[int] = "uniform",
    weights: str = "model",
    **options,
) -> KVSlimModel:
    """Return ``model`` with every attention layer replaced by a fixed-capacity cached attention.

    Args:
        model: an HF causal LM (``AutoModelForCausalLM``) whose attention runs through SDPA.
        method: a registered method name (``kvslim_fx.methods.METHODS``).
        budget: KV slots kept per layer, sink slots included (int), or a fraction of the prompt
            in (0, 1] (float); ``None`` keeps everything (``full``).
        chunk_size: prompts longer than this are prefilled in chunks of this many tokens.
        prefill: ``"bounded"``: the cache never exceeds the budget, not even while the prompt
            is read; ``"full"``: the cache holds the whole prompt, which
            :meth:`KVSlimModel.end_prompt` (called by :func:`kvslim_fx.generate`) compresses once
            to the budget, scored by the prompt's last ``prefill_window`` queries, so a question
            at the end of the prompt decides what is kept (peak memory: the prompt's cache).
        prefill_window: the queries that score the prompt in ``"full"`` mode (SnapKV's
            observation window).
        storage: a registered storage (``kvslim_fx.storage.STORAGES``), with options after
            colons: how the K/V rows are held (``"dense"``: as they are, in the model's dtype;
            ``"int8"`` or ``"int8:group=16"``: int8 codes and a scale per group of channels).
        budget_schedule: how the budget spreads over the layers: ``"uniform"`` (``budget`` slots
            each), ``"pyramid"`` (PyramidKV: more slots in the lower layers, decreasing linearly,
            the same total), or a list of slots per layer (``budget`` is then their mean and may
            be left out).
        weights: ``"model"``: the linear weights as the model holds them (a model that torchao's
            ``quantize_(model, Int8WeightOnlyConfig())`` converted decodes from its int8
            weights); ``"int8"``: quantize the traced graph's linear weights the same way
            (symmetric int8, a scale per output row; the model passed in keeps its weights).
            Int8 weights are read as int8 by a compiled or packaged decode step
            (:mod:`kvslim_fx.passes.int8_linear`).
        **options: the method's own options (e.g. ``sink``).
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise KVSlimError(f"expected a Hugging Face causal LM, got {type(model).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise KVSlimError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if prefill not in PREFILL_MODES:
        raise KVSlimError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got {prefill!r}")
    positive("prefill_window", prefill_window)
    if weights not in WEIGHTS:
        raise KVSlimError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    schedule = check_schedule(budget_schedule)
    if not isinstance(schedule, str) and budget is None:
        budget = max(1, round(sum(schedule) / len(schedule)))
    algo = make_method(method, budget, **options)
    store = make_storage(storage)
    store.cls.check_method(algo)
    config = model.config
    arch = getattr(config, "model_type", type(model).__name__)
    max_pos = _max_positions(config)

    with _sdpa_attention(model, arch), int8_placeholders(model) as int8, torch.no_grad():
        example = torch.zeros(2, 8, dtype=torch.long, device=_device(model))
        # Real positions: all-zero ones would make HF's mask code trace a packed-sequence path.
        positions = torch.arange(8, device=example.device).expand(2, 8).clone()
        seq = torch.export.Dim("seq", min=1, max=max(max_pos - 1, 2))
        batch = torch.export.Dim("batch", min=1, max=1024)
        dims = {0: batch, 1: seq}
        try:
            ep = torch.export.export(
                model,
                (),
                kwargs={"input_ids": example, "position_ids": positions, "use_cache": False},
                dynamic_shapes={"input_ids": dims, "position_ids": dims, "use_cache": None},
                strict=False,
            )
        except Exception as err:
            raise KVSlimError(
                f"{arch}: torch.export could not trace the model ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); kvslim_fx needs a model that "
                "exports with input_ids and position_ids"
            ) from err
    gm = ep.module()
    out_keys = _output_keys(gm)
    if "logits" not in out_keys:
        raise KVSlimError(f"{arch}: the traced model returns {out_keys}, not logits")
    # Before the attention rewrite: a storage that factors the projections (LoRC) then
    # factors the int8 weights the model will run with.
    quantize_linears(gm, int8, quantize=weights == "int8")
    num_layers = getattr(config, "num_hidden_layers", 0)
    try:
        wants_rope = algo.needs_rope or store.pre_rope
        ropes = rope_facts(model, num_layers) if wants_rope else [None] * num_layers
        # Without rotary embeddings (learned positions) the keys are already un-rotated.
        pre_rope = store.pre_rope and any(r is not None for r in ropes)
        replace_sdpa(gm, config, lambda site: LayerCache(algo, store(site, ropes[site.layer])),
                     pre_rope, store.cls.needs_projections)  # fmt: skip
    except (GraphRewriteError, UnsupportedRope) as err:
        raise KVSlimError(str(err)) from None
    store.cls.finish_layers([m.storage for m in gm.modules() if isinstance(m, LayerCache)])
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if inputs != ["input_ids", "position_ids", "kv_positions"]:
        raise KVSlimError(f"{arch}: unexpected inputs {inputs} after the rewrite")
    layers = sum(isinstance(m, LayerCache) for m in gm.modules())
    logits_index = out_keys.index("logits")
    head = split_head(gm, logits_index)
    result = KVSlimModel(
        gm, algo, config, logits_index, chunk_size, prefill, prefill_window,
        check_schedule(schedule, layers), head,
    )  # fmt: skip
    generation = getattr(model, "generation_config", None)
    result.eos_token_id = getattr(generation, "eos_token_id", None)
    result.pad_token_id = getattr(generation, "pad_token_id", None)
    result.vocab_size = _vocab_size(model)
    return result


@contextlib.contextmanager
def _sdpa_attention(model: nn.Module, arch: str):
    """Trace in eval mode with SDPA attention, whatever the user loaded; restore both after."""
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    if softcap:
        # Some transformers releases let such a model run SDPA and silently drop the cap.
        raise KVSlimError(
            f"{arch}: attention logits are soft-capped (attn_logit_softcapping={softcap}), which "
            "SDPA cannot express; kvslim_fx rewrites SDPA attention only, so this architecture "
            "is unsupported"
        )
    before = getattr(model.config, "_attn_implementation", None)
    was_training = model.training
    model.eval()
    if before != "sdpa":
        try:
            model.set_attn_implementation("sdpa")
        except Exception as err:
            raise KVSlimError(
                f"{arch}: attention is {before!r} and the model refuses SDPA "
                f"({str(err).split('. ')[0]}); "
                "kvslim_fx rewrites SDPA attention only, so this architecture is unsupported"
            ) from None
    try:
        yield
    finally:
        model.train(was_training)
        if before is not None and before != "sdpa":
            model.set_attn_implementation(before)


def _vocab_size(model: nn.Module) -> int | None:
    """The token ids the model can look up: its input embedding's rows, which some models pad
    past ``config.vocab_size``; the config's figure where the embedding cannot be found."""
    with contextlib.suppress(AttributeError, NotImplementedError):
        weight = getattr(model.get_input_embeddings(), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
    return getattr(model.config, "vocab_size", None)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _output_keys(gm) -> list[str]:
    spec = getattr(gm, "_out_spec", None)
    context = getattr(spec, "context", None)
    return list(context) if context else []
