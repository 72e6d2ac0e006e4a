"""Decode speed, memory and a roofline: kvslim_fx against Hugging Face's own decoding paths.

For every (row, context, batch) cell: prefill a random prompt of exactly ``context`` tokens, then
time ``--new-tokens`` greedy decode steps, and record prefill seconds, decode tokens/s, peak
memory, cache bytes, the ratio to HF eager and the fraction of the memory-bandwidth roofline::

    python benchmarks/decode.py --threads 2        # every row at 512, 2048 and 8192 (CPU)
    python benchmarks/decode.py --model tiny --contexts 64,256 --new-tokens 16   # smoke run
    python benchmarks/decode.py --contexts 8192 --threads 2 --tag 8k \
        --rows 'hf-*,streaming-2048-compile,kvslimmer-2048-compile'
    python benchmarks/decode.py --contexts 512 --weights model,int8 --rows 'hf-*,full-compile*'
    python benchmarks/decode.py --device cuda --batch 1,8 --tag gpu   # bf16, 2k to 32k

Rows (``--rows`` takes comma-separated shell patterns over these names):

* ``hf-eager``: the HF model with its ``DynamicCache`` (a full cache), eager.
* ``hf-static-compile``: HF's own compiled path, as ``generate(cache_implementation="static")``
  runs it: a ``StaticCache`` sized prompt + new tokens, an eager prefill, and decode steps through
  ``model.get_compiled_call(None)`` (``torch.compile(model.__call__)`` with HF's default
  ``CompileConfig``: inductor, ``mode="reduce-overhead"``, which is CUDA graphs on a GPU and
  plain inductor on a CPU).
* ``full-eager``, ``full-compile``, ``full-aoti``: kvslim ``full`` eager, under ``torch.compile``,
  and as an AOTInductor package (``kvslim_fx.export`` → ``kvslim_fx.load``).
* ``<method>-<budget>-compile`` (and ``-eager`` with ``--method-modes compile,eager``): each
  compression method at each budget, e.g. ``streaming-2048-compile``, ``snapkv-25%-compile``.
  A budget is a number of slots per layer or a fraction of the context (``round(frac * ctx)``).
  A cell whose budget holds the whole sequence is skipped (it compresses nothing).
  ``--storages dense,int8`` adds ``<method>+int8-<budget>-<mode>`` rows: the same policy over
  the int8 storage. ``--weights model,int8`` adds every kvslim row over int8 linear weights
  (``transform(..., weights="int8")``, torchao's per-row int8), its name ending in ``-w8``.

Timing. Every cell first runs every shape its timed run will use (the prompt's prefill chunks
and ``--warmup`` decode steps) on the same cache, so compilation is never timed; then the cache
is reset and a timed run is one prefill and ``--new-tokens`` decode steps, each one forward over
one token per row plus its argmax, like ``generate``; ``--repeats`` timed runs (default 5), each
on a reset cache. Step times come from ``perf_counter`` on a CPU and from CUDA events on a GPU
(no host sync inside the loop). A repeat's step time is its median step; a cell reports the
median over repeats and their min and max (prefill likewise); decode tokens/s =
``batch / median step``. A compiled row records the graphs compiled during the timed runs
(``recompiles``, which should be 0). Inputs are seeded random token ids, no padding.

Memory. Peak memory is what one decode run needs: the state it holds when it starts (a static or
kvslim cache, allocated whole) plus the most it allocates on top while it prefills and decodes (a
dynamic cache's growth, activations, logits). Weights, code and the compiler's leftovers are there
before the run and not counted. On a GPU the growth is ``max_memory_allocated``; on a CPU it is the
peak RSS (``VmHWM``, reset just before the timed run, after ``malloc_trim`` has returned what the
warm-up freed, so the run's allocations cannot hide in memory the allocator kept); the largest over
the repeats. RSS is per process and allocators keep memory, so each cell runs in its own subprocess
(``--in-process`` to opt out: faster, CPU numbers then approximate); a crash (an OOM kill) then
stays in its cell. The JSON also has the process's peak (``process_peak_bytes``: RSS, or CUDA
memory reserved). Cache bytes: the HF cache's K/V tensors at the end of the run (a static cache is
allocated whole), kvslim's ``cache_bytes()`` (K, V and per-slot metadata at capacity; ``full``
rounds its capacity up).

Roofline. Each cell measures the memory bandwidth in its own process, at its thread count,
just before its timed runs: a large ``copy_`` (bytes read + written) and a ``sum`` (bytes
read), best of 5 each; the floor takes the larger. A decode step must read every weight once
as the row holds it (int8 weights: codes and scales; the output head whole, tied or not; an
input embedding that is only looked up is left out) and the K/V of every occupied cache slot;
the floor is ``bytes / bandwidth`` per step and a row's ``roofline`` is floor / median step.

Writes ``OUT.json`` (every cell, per-step times, settings, versions), ``OUT.md`` (the table) and
``OUT.png`` (tokens/s against context per row); ``OUT`` is ``benchmarks/results/decode[-TAG]``.
A cell that fails (out of memory, a method refusing a config) is recorded with its error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import fnmatch
import gc
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from common import cache_kwargs, formatted, full_kv_bytes, log, markdown_table, save_results

from kvslim_fx.budget import parse_budgets

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_METHODS = "streaming,kvslimmer,weightedkv,h2o,tova,snapkv"


# --------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    """One way of decoding: one of HF's paths, or a kvslim method at a budget in a mode."""

    name: str
    kind: str  # "hf-eager" | "hf-static" | "kvslim"
    method: str | None = None
    budget: int | float | None = None  # slots, or a fraction of the context
    mode: str = "eager"  # "eager" | "compile" | "aoti"
    storage: str = "dense"  # a kvslim row's storage (kvslim_fx.STORAGES, with options)
    weights: str = "model"  # a kvslim row's linear weights: transform(weights=...)

    def slots(self, context: int) -> int | None:
        if self.budget is None:
            return None
        if isinstance(self.budget, float):
            return max(1, round(self.budget * context))
        return self.budget


def budget_label(budget: int | float) -> str:
    return f"{budget * 100:g}%" if isinstance(budget, float) else str(budget)


# A kvslim row's name ends in its weights' tag (none for the model's own weights).
WEIGHT_TAGS = {"model": "", "int8": "-w8"}


def all_rows(
    methods: list[str],
    budgets: list[int | float],
    modes: list[str],
    storages: tuple[str, ...] = ("dense",),
    weights: tuple[str, ...] = ("model",),
) -> list[Row]:
    """HF's rows, full's per storage, then every method × storage × budget × mode, each per
    weights; a row over a storage other than dense is named ``<method>+<storage>-<budget>-<mode>``,
    e.g. ``streaming+int8-2048-compile`` (``full+xkv-compile``), and one over int8 weights ends in
    ``-w8`` (``streaming-2048-compile-w8``)."""
    rows = [Row("hf-eager", "hf-eager"), Row("hf-static-compile", "hf-static", mode="compile")]
    for w in weights:
        tag = WEIGHT_TAGS[w]
        for storage in storages:
            label = "full" if storage == "dense" else f"full+{storage}"
            rows += [Row(f"{label}-{m}{tag}", "kvslim", "full", None, m, storage, w)
                     for m in ("eager", "compile", "aoti")]  # fmt: skip
    for w in weights:
        for method in methods:
            for storage in storages:
                label = method if storage == "dense" else f"{method}+{storage}"
                for budget in budgets:
                    for mode in modes:
                        name = f"{label}-{budget_label(budget)}-{mode}{WEIGHT_TAGS[w]}"
                        rows.append(Row(name, "kvslim", method, budget, mode, storage, w))
    return rows


def select_rows(rows: list[Row], patterns: str | None) -> list[Row]:
    """The rows matching any comma-separated shell pattern, in ``rows`` order."""
    if not patterns:
        return rows
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    unmatched = [p for p in wanted if not any(fnmatch.fnmatchcase(r.name, p) for r in rows)]
    if unmatched:
        raise ValueError(
            f"--rows {unmatched} match no row; rows: {', '.join(r.name for r in rows)}"
        )
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]


def skip_reason(row: Row, context: int, new_tokens: int) -> str | None:
    slots = row.slots(context)
    if slots is not None and slots >= context + new_tokens:
        return f"budget {slots} ≥ sequence {context + new_tokens}: nothing to compress"
    return None


# ---------------------------------------------------------------------------- the roofline


def kv_read_bytes(layers: list[tuple[int, int | None]], context: int, steps: int) -> float:
    """Mean K/V bytes a decode step reads over ``steps`` steps after a ``context`` prefill.

    ``layers``: per layer (bytes of one slot's K and V over the batch, capacity or None for a
    cache that grows). Step ``t`` attends over the ``context + t`` cached tokens and its own.
    """
    total = 0
    for t in range(steps):
        tokens = context + t + 1
        total += sum(
            per_slot * (tokens if cap is None else min(cap, tokens)) for per_slot, cap in layers
        )
    return total / max(steps, 1)


def roofline(weight_bytes: int, kv_bytes: float, bandwidth_gbs: float, step_s: float) -> dict:
    """Floor seconds per step = bytes moved / bandwidth, and the fraction of it a row reaches."""
    floor_s = (weight_bytes + kv_bytes) / (bandwidth_gbs * 1e9)
    return {"floor_s": floor_s, "roofline": floor_s / step_s if step_s > 0 else None}


def model_weights_read_bytes(core: Any, state: set[int]) -> int:
    """``weights_read_bytes`` of a transformed model: every constant of its graph and its head
    that is not cache ``state`` (ids), int8 weights as their codes and scales, except a table
    only ever read by embedding lookups."""
    whole, looked_up = set(), set()
    for module in (core.graph, core.head):
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "get_attr" and node.users:
                ptr = attrgetter(node.target)(module).data_ptr()
                embedding = all(u.target is torch.ops.aten.embedding.default for u in node.users)
                (looked_up if embedding else whole).add(ptr)
    sizes = {}
    named = [*core.named_parameters(remove_duplicate=False),
             *core.named_buffers(remove_duplicate=False)]  # fmt: skip
    for _, t in named:
        if id(t) not in state and not (t.data_ptr() in looked_up and t.data_ptr() not in whole):
            sizes[t.data_ptr()] = t.numel() * t.element_size()
    return sum(sizes.values())


def weights_read_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: every parameter once (tied ones once).

    An input embedding not tied to the output head is read only at the looked-up rows, so it
    is left out; a tied one is read whole by the head.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight.data_ptr() != head.weight.data_ptr():
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def memory_bandwidth(device: torch.device, mib: int, repeats: int = 5) -> dict[str, float]:
    """GB/s this process moves with torch's current thread count, best of ``repeats``: a large
    ``copy_`` (bytes read + written) and a ``sum`` (bytes read), and the larger of the two
    (``gbs``, the floor's: a decode step mostly reads)."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy faults the destination's pages in: not timed

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return min(times)

    copy = 2 * n * 4 / best(lambda: dst.copy_(src)) / 1e9
    read = n * 4 / best(src.sum) / 1e9
    return {"copy_gbs": copy, "read_gbs": read, "gbs": max(copy, read)}


# ------------------------------------------------------------------------ measuring helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Marks:
    """Time stamps between decode steps: ``perf_counter`` on a CPU, CUDA events on a GPU.

    Events are recorded on the stream, so the loop never waits for the GPU; the times are read
    once, after it.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [
                a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)
            ]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


class PeakMemory:
    """Memory one decode run needs: what it holds from the start (a preallocated cache) plus
    the most it allocates on top during the run.

    Weights, code and the compiler's leftovers are not counted: they are there before the run
    starts. On a CPU the growth is read from the peak RSS (``VmHWM``, reset just before the run)
    after ``malloc_trim`` has handed back what the warm-up freed, so allocations of the run
    cannot hide in memory the allocator kept.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.held = self.base = 0

    def start(self, held_bytes: int) -> None:
        self.held = held_bytes
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _proc_status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return self.held + torch.cuda.max_memory_allocated(self.device) - self.base
        return self.held + max(0, _proc_status("VmHWM") - self.base)

    def process_peak(self) -> int:
        """The whole process's peak since ``start`` (RSS, or CUDA memory reserved)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device)
        return _proc_status("VmHWM")


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (0 where there is no procfs)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else 0


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------------------- models


def tiny_model(max_positions: int) -> Any:
    """A small random Llama (2 layers, hidden 64, GQA 4/2) for smoke runs; seeded."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    finally:
        torch.random.set_rng_state(state)


def load_model(spec: str | None, dtype: torch.dtype, device: torch.device, length: int) -> Any:
    """The HF model: ``tiny``, a checkpoint folder, or the default SmolLM2-135M-Instruct.

    A model with fewer positions than ``length`` gets its config's limit raised (timing only:
    plain RoPE is defined at any position, but the model was not trained that far).
    """
    if spec == "tiny":
        model = tiny_model(max(4096, length))
    else:
        from transformers import AutoModelForCausalLM

        from kvslim_fx.eval.default_model import resolve_model

        model = AutoModelForCausalLM.from_pretrained(
            resolve_model(spec), dtype=dtype, attn_implementation="sdpa", local_files_only=True
        ).eval()
    config = model.config
    if getattr(config, "max_position_embeddings", length) < length:
        config.max_position_embeddings = length
    return model.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------- decoders
# A decoder holds one row's model and cache: reset(), prefill(ids) → logits, step(token) →
# logits, plus what the report needs (cache bytes, per-layer slot sizes).


class HFDecoder:
    """HF's model over a DynamicCache (eager) or a StaticCache with HF's compiled forward."""

    def __init__(self, hf: Any, row: Row, batch: int, max_length: int) -> None:
        self.hf, self.batch, self.max_length = hf, batch, max_length
        self.static = row.kind == "hf-static"
        # What generate() itself calls per decode step with a static cache (prefill stays eager).
        self.forward = hf.get_compiled_call(None) if self.static else hf.__call__
        self.cache: Any = None
        self.seen = 0
        self.chunk_size = max_length  # one prefill forward

    def reset(self) -> None:
        from transformers import DynamicCache, StaticCache

        if not self.static:
            self.cache = DynamicCache(config=self.hf.config)
        elif self.cache is None:
            self.cache = StaticCache(config=self.hf.config, max_cache_len=self.max_length)
        else:
            self.cache.reset()  # same tensors: the compiled step stays valid
        self.seen = 0

    def _positions(self, length: int) -> torch.Tensor:
        pos = torch.arange(self.seen, self.seen + length, device=self.hf.device)
        return pos.expand(self.batch, length)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.hf(
            input_ids=ids,
            position_ids=self._positions(ids.shape[1]),
            **cache_kwargs(self.hf, self.cache),
            use_cache=True,
            logits_to_keep=1,
        )
        self.seen += ids.shape[1]
        return out.logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        # No attention mask (no padding): with a static cache the mask comes from positions,
        # and a growing 2-D mask would change shape, and so recompile, every step.
        out = self.forward(
            input_ids=token,
            position_ids=self._positions(1),
            **cache_kwargs(self.hf, self.cache),
            use_cache=True,
        )
        self.seen += 1
        return out.logits

    def cache_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.cache.layers
            for t in (layer.keys, layer.values)
        )

    def weight_bytes(self) -> int:
        return weights_read_bytes(self.hf)

    def held_bytes(self) -> int:
        # A dynamic cache starts empty and grows during the run; a static one is all there.
        return self.cache_bytes() if self.static else 0

    def slot_layers(self) -> list[tuple[int, int | None]]:
        out = []
        for layer in self.cache.layers:
            b, h, _, d = layer.keys.shape
            out.append(
                (2 * b * h * d * layer.keys.element_size(), getattr(layer, "sliding_window", None))
            )
        return out


class KVSlimDecoder:
    """A transformed model: eager, under torch.compile, or an AOTInductor package."""

    def __init__(self, hf: Any, row: Row, batch: int, context: int, max_length: int, args) -> None:
        import kvslim_fx
        from kvslim_fx.methods import parse_spec

        self.batch, self.context, self.max_length = batch, context, max_length
        method, options = parse_spec(row.method)  # a spec such as kvslimmer:recent=32
        core = kvslim_fx.transform(hf, method, row.slots(context), chunk_size=args.chunk_size,
                                   storage=row.storage, weights=row.weights, **options)  # fmt: skip
        core.reset(batch_size=batch, max_length=max_length, prompt_len=context)
        self.core = core
        self.model: Any = core
        self.tmp: tempfile.TemporaryDirectory | None = None
        if row.mode == "compile":
            self.model = torch.compile(core, mode=args.compile_mode)
        elif row.mode == "aoti":
            self.tmp = tempfile.TemporaryDirectory(prefix="kvslim-decode-")
            path = kvslim_fx.export(
                core,
                Path(self.tmp.name) / "model.pt2",
                batch_size=batch,
                max_length=max_length,
                prompt_len=context,
            )
            self.model = kvslim_fx.load(path)
        self.chunk_size = self.model.chunk_size
        self.ones = torch.ones(batch, 1, dtype=torch.long, device=hf.device)

    def reset(self) -> None:
        # The runner refills its own state; the model re-uses its buffers when shapes match.
        target = self.model if isinstance(self.model, _runner_type()) else self.core
        target.reset(batch_size=self.batch, max_length=self.max_length, prompt_len=self.context)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(ids)
        for i in range(0, ids.shape[1], self.chunk_size):  # generate()'s chunk loop
            chunk = slice(i, i + self.chunk_size)
            logits = self.model(
                ids[:, chunk].contiguous(), mask[:, chunk].contiguous(), logits_to_keep=1
            )
        # As generate(): a storage's prompt-end hook (xkv factors the prompt here).
        self.model.end_prompt()
        return logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self.model(token, self.ones)

    def cache_bytes(self) -> int:
        if isinstance(self.model, _runner_type()):
            return int(self.model.meta["cache_bytes"])
        return self.core.cache_bytes()

    def weight_bytes(self) -> int:
        state = {id(t) for t, _ in self.core.state().values()}
        return model_weights_read_bytes(self.core, state)

    def held_bytes(self) -> int:
        """Every state tensor (K, V, metadata, the trash slot), allocated before the run."""
        if isinstance(self.model, _runner_type()):
            tensors = [t for t, _ in self.model.state.values()]
        else:
            tensors = [b for b, _ in self.core.state().values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def slot_layers(self) -> list[tuple[int, int | None]]:
        """Each layer's storage bytes per slot (K, V and whatever a storage keeps per row, such
        as int8's scales) and its capacity (the trash slot left out)."""
        if isinstance(self.model, _runner_type()):
            named = {name: t for name, (t, _) in self.model.state.items()}
        else:
            named = {name: b for name, (b, _) in self.core.state().items()}
        layers: dict[str, list] = {}
        for name, tensor in named.items():
            layer, sep, _ = name.partition(".storage.")
            if sep:  # rows [B, H_kv, capacity + 1, ...]
                layers.setdefault(layer, []).append(tensor)
        return [
            (sum(t[:, :, :1].numel() * t.element_size() for t in ts), ts[0].shape[2] - 1)
            for ts in layers.values()
        ]

    def close(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _runner_type() -> type:
    from kvslim_fx.export import Runner

    return Runner


# ------------------------------------------------------------------------------ one cell


def warmup_lengths(context: int, chunk: int) -> list[int]:
    """One prefill call of each distinct chunk length the timed prefill of ``context`` makes."""
    lengths = [min(context, chunk)]
    if context > chunk and context % chunk:
        lengths.append(context % chunk)
    return lengths


@torch.no_grad()
def run_cell(hf: Any, row: Row, context: int, batch: int, args) -> dict:
    """Build the row, warm it up, measure the bandwidth, then time ``repeats`` runs of one
    prefill and ``new_tokens`` decode steps."""
    device = hf.device
    n = args.new_tokens
    max_length = context + n
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, hf.config.vocab_size, (batch, context), generator=gen).to(device)

    start = time.perf_counter()
    graphs0 = compiled_graphs()
    if row.kind == "kvslim":
        dec: Any = KVSlimDecoder(hf, row, batch, context, max_length, args)
    else:
        dec = HFDecoder(hf, row, batch, max_length)
    try:
        # Warm-up: every shape the timed run uses (the prompt's chunk lengths, then decode).
        dec.reset()
        for length in warmup_lengths(context, dec.chunk_size):
            logits = dec.prefill(ids[:, :length])
        token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(min(args.warmup, n)):
            token = dec.step(token)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        build_s = time.perf_counter() - start
        graphs_warm = compiled_graphs()

        # The floor's bandwidth: this process, this thread count, before the timed runs.
        bandwidth = memory_bandwidth(device, args.bandwidth_mib)
        runs = [timed_run(dec, ids, n, device) for _ in range(args.repeats)]
        prefills = [r["prefill_s"] for r in runs]
        medians = [statistics.median(r["step_s"]) for r in runs]
        step_median = statistics.median(medians)
        kv = kv_read_bytes(dec.slot_layers(), context, n)
        return {
            "status": "ok",
            "repeats": len(runs),
            # Each repeat's prefill and its median step; a figure is the median over repeats,
            # its spread the repeats' min and max.
            "prefill_runs_s": prefills,
            "step_median_runs_s": medians,
            "step_s": [r["step_s"] for r in runs],
            "prefill_s": statistics.median(prefills),
            "prefill_min_s": min(prefills),
            "prefill_max_s": max(prefills),
            "step_median_s": step_median,
            "step_min_s": min(medians),
            "step_max_s": max(medians),
            "tokens_per_s": batch / step_median,
            "peak_mem_bytes": max(r["peak"] for r in runs),
            "peak_mem_kind": "CUDA allocated" if device.type == "cuda" else "RSS",
            "process_peak_bytes": max(r["process_peak"] for r in runs),
            "held_bytes": runs[0]["held"],
            "cache_bytes": dec.cache_bytes(),
            "full_cache_bytes": full_kv_bytes(hf.config, max_length, hf.dtype, batch),
            "weight_bytes": dec.weight_bytes(),
            "kv_read_bytes": kv,
            "bandwidth": bandwidth,
            "bandwidth_gbs": bandwidth["gbs"],
            "build_s": build_s,
            "graphs_compiled": graphs_warm - graphs0,
            "recompiles": compiled_graphs() - graphs_warm,
            "chunk_size": dec.chunk_size,
            "max_positions": hf.config.max_position_embeddings,
        }
    finally:
        if isinstance(dec, KVSlimDecoder):
            dec.close()


def timed_run(dec: Any, ids: torch.Tensor, n: int, device: torch.device) -> dict:
    """One timed prefill of ``ids`` and ``n`` decode steps on a reset cache, with its peak
    memory."""
    dec.reset()
    gc.collect()
    sync(device)
    memory = PeakMemory(device)
    memory.start(dec.held_bytes())
    t0 = time.perf_counter()
    logits = dec.prefill(ids)
    token = logits[:, -1].argmax(-1, keepdim=True)
    sync(device)
    prefill_s = time.perf_counter() - t0
    marks = Marks(device)
    marks.mark()
    for _ in range(n):
        token = dec.step(token)[:, -1].argmax(-1, keepdim=True)
        marks.mark()
    steps = marks.intervals()
    return {
        "prefill_s": prefill_s,
        "step_s": steps,
        "peak": memory.peak(),
        "process_peak": memory.process_peak(),
        "held": memory.held,
    }


def cell_record(row: Row, context: int, batch: int, args) -> dict:
    return {
        "row": row.name,
        **{k: v for k, v in asdict(row).items() if k != "name"},
        "budget_slots": row.slots(context),
        "context": context,
        "batch": batch,
        "new_tokens": args.new_tokens,
    }


def run_cell_safely(hf: Any, row: Row, context: int, batch: int, args) -> dict:
    """``run_cell``, with a failure recorded as the cell's error instead of ending the run."""
    try:
        return run_cell(hf, row, context, batch, args)
    except Exception as err:  # OOM, a method refusing a budget, a compile failure...
        return {"status": "error", "error": f"{type(err).__name__}: {_one_line(err)}"}
    finally:
        gc.collect()
        if hf.device.type == "cuda":
            torch.cuda.empty_cache()


def _one_line(err: BaseException, limit: int = 600) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------- subprocess worker


def worker(spec_path: str) -> int:
    """Run one cell in this fresh process (``--worker SPEC``) and write its result as JSON."""
    # Linux: die with the parent, so a killed run leaves no worker behind.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    setup_torch(args)
    row = Row(**spec["row"])
    device = torch.device(args.device)
    preload()
    hf = load_model(args.model, DTYPES[args.dtype], device, spec["context"] + args.new_tokens)
    result = run_cell_safely(hf, row, spec["context"], spec["batch"], args)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_isolated(row: Row, context: int, batch: int, args) -> dict:
    """One cell in a subprocess: a fair peak RSS, and a crash (OOM kill) stays in its cell."""
    with tempfile.TemporaryDirectory(prefix="kvslim-decode-cell-") as tmp:
        spec = Path(tmp) / "spec.json"
        result = Path(tmp) / "result.json"
        spec.write_text(
            json.dumps(
                {
                    "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
                    "row": asdict(row),
                    "context": context,
                    "batch": batch,
                    "result": str(result),
                }
            )
        )
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)]
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=args.cell_timeout or None,
            )
        except subprocess.TimeoutExpired:
            return {"status": "error", "error": f"timed out after {args.cell_timeout} s"}
        if result.is_file():
            return json.loads(result.read_text())
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        oom = " (killed: out of memory?)" if proc.returncode == -9 else ""
        return {"status": "error", "error": f"worker died, {why}{oom}: {tail}"[:600]}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def preload() -> None:
    """Import what any row may use before the memory baseline, so imports are not its peak."""
    import torch._dynamo
    import torch._inductor.compile_fx
    import torch._inductor.package  # noqa: F401
    import transformers.cache_utils  # noqa: F401

    import kvslim_fx  # noqa: F401


def setup_torch(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


# ----------------------------------------------------------------------------------- report


def add_ratios(cells: list[dict]) -> None:
    """Decode tokens/s against HF eager and HF static + compile at the same context and batch."""
    ok = {(c["row"], c["context"], c["batch"]): c for c in cells if c["status"] == "ok"}
    for c in cells:
        for ref, key in (("hf-eager", "vs_hf_eager"), ("hf-static-compile", "vs_hf_static")):
            base = ok.get((ref, c["context"], c["batch"]))
            c[key] = (
                c["tokens_per_s"] / base["tokens_per_s"] if base and c["status"] == "ok" else None
            )


def add_roofline(cells: list[dict]) -> None:
    """Each cell's floor from the bandwidth its own process measured."""
    for c in cells:
        if c["status"] == "ok":
            c |= roofline(
                c["weight_bytes"], c["kv_read_bytes"], c["bandwidth_gbs"], c["step_median_s"]
            )


def table(cells: list[dict]) -> str:
    """A markdown row per cell; ``–`` for a number a cell lacks (a failed one lacks them all)."""
    fields = ["row", "context", "batch", "status", "error", "reason", "recompiles", "prefill_s"]
    fields += ["prefill_min_s", "prefill_max_s", "tokens_per_s", "step_median_s", "step_min_s"]
    fields += ["step_max_s", "vs_hf_eager", "vs_hf_static", "peak_mem_bytes", "cache_bytes"]
    fields += ["full_cache_bytes", "bandwidth_gbs", "floor_s", "roofline"]
    c = pd.DataFrame(cells).reindex(columns=fields)
    why = c.error.fillna(c.reason).fillna("").str.replace("|", "/")  # a | would open a column
    why = why.where(why.str.len() <= 120, why.str[:119] + "…")
    recompiled = c.recompiles.map(lambda n: f"{n:.0f} recompiles in timed run" if n else "")
    columns = {
        "row": c.row,
        "context": c.context,
        "batch": c.batch,
        "prefill s (min–max)": formatted(c.prefill_s, "{:.3f}", "–")
        + spread(c.prefill_min_s, c.prefill_max_s, 1, "{:.3f}"),
        "decode tok/s": formatted(c.tokens_per_s, "{:.1f}", "–"),
        "ms/step (min–max)": formatted(c.step_median_s * 1e3, "{:.2f}", "–")
        + spread(c.step_min_s, c.step_max_s, 1e3, "{:.2f}"),
        "× HF eager": formatted(c.vs_hf_eager, "{:.2f}×", "–"),
        "× HF static": formatted(c.vs_hf_static, "{:.2f}×", "–"),
        "peak mem MiB": formatted(c.peak_mem_bytes / 2**20, "{:.1f}", "–"),
        "cache MiB": formatted(c.cache_bytes / 2**20, "{:.2f}", "–"),
        "% of full": formatted(100 * c.cache_bytes / c.full_cache_bytes, "{:.1f}%", "–"),
        "GB/s": formatted(c.bandwidth_gbs, "{:.1f}", "–"),
        "floor ms": formatted(c.floor_s * 1e3, "{:.2f}", "–"),
        "roofline": formatted(c.roofline, "{:.0%}", "–"),
        "note": recompiled.where(c.status.eq("ok"), c.status + ": " + why),
    }
    return markdown_table(pd.DataFrame(columns), align="l" + "r" * 13 + "l")


def spread(lo: pd.Series, hi: pd.Series, scale: float, fmt: str) -> pd.Series:
    """`` (lo–hi)``: the repeats' range; empty where a cell has none."""
    text = " (" + (lo * scale).map(fmt.format) + "–" + (hi * scale).map(fmt.format) + ")"
    return text.where(lo.notna() & hi.notna(), "")


def plot(cells: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("matplotlib is not installed: no plot (pip install 'kvslim-fx[bench]')")
        return False
    batches = sorted({c["batch"] for c in cells})
    contexts = sorted({c["context"] for c in cells})
    rows = list(dict.fromkeys(c["row"] for c in cells))
    # HF's rows in black; kvslim's in colour (20 distinct), the mode in the line and marker.
    colours = plt.get_cmap("tab20").colors
    mode_style = {"compile": ("-", "o"), "eager": ("-.", "s"), "aoti": (":", "D")}
    fig, axes = plt.subplots(1, len(batches), figsize=(6.4 * len(batches), 4.6), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for i, row in enumerate(rows):
            pts = sorted(
                (c["context"], c["tokens_per_s"])
                for c in cells
                if c["row"] == row and c["batch"] == batch and c["status"] == "ok"
            )
            if not pts:
                continue
            if row.startswith("hf-"):
                ls, marker, colour = "--", "s" if row == "hf-eager" else "^", "black"
            else:
                mode = next(c["mode"] for c in cells if c["row"] == row)
                ls, marker = mode_style[mode]
                colour = colours[i % len(colours)]
            ax.plot(*zip(*pts, strict=True), ls=ls, marker=marker, color=colour, label=row, ms=4)
        # The floor of a full cache, as the rows of HF eager measured it.
        floor = sorted(
            (c["context"], batch / c["floor_s"])
            for c in cells
            if c["row"] == "hf-eager" and c["batch"] == batch and c["status"] == "ok"
        )
        if floor:
            ax.plot(*zip(*floor, strict=True), ":x", color="gray", label="roofline, full cache")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # Ticks at the measured contexts, and plain numbers on the log axes (not 4x10^1).
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s (log)")
        ax.set_title(f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
        )
    except OSError:
        return ""
    return out.stdout.strip()


def environment(args, device: torch.device) -> dict:
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        name = match.group(1) if match else platform.processor()
    commit = _git("rev-parse", "--short", "HEAD")
    # Timings belong to the code that ran: say so when it was not a clean commit.
    if _git(
        "status", "--porcelain", "--untracked-files=no", "--", "kvslim_fx", "passes", "kernels"
    ):
        commit += "+dirty"
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": name,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": commit,
    }


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="rows: "
        + ", ".join(
            r.name for r in all_rows(DEFAULT_METHODS.split(","), [2048, 0.25], ["compile"])
        ),
    )
    p.add_argument(
        "--model",
        help="'tiny' (random, for smoke runs), a HF checkpoint folder, or "
        "nothing for the default SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--contexts",
        help="prompt lengths (default: 512,2048,8192 on a CPU, 2048,8192,32768 on a GPU)",
    )
    p.add_argument("--batch", default="1", help="batch sizes, e.g. 1,8 (default: 1)")
    p.add_argument("--new-tokens", type=int, default=64, help="timed decode steps (default: 64)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps per cell")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed runs per cell (prefill + decode; default: 5)"
    )
    p.add_argument("--rows", help="comma-separated shell patterns over row names (default: all)")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"names or specs, e.g. kvslimmer:recent=32 (default: {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--budgets",
        default="2048,0.25",
        help="slots per layer or fractions of the context (default: 2048,0.25)",
    )
    p.add_argument(
        "--storages",
        default="dense",
        help="storages of the method rows, e.g. dense,int8 (default: dense)",
    )
    p.add_argument(
        "--weights",
        default="model",
        help="linear weights of the kvslim rows: model (as loaded), int8 (transform's "
        "weights='int8', rows named ...-w8), or both: model,int8 (default: model)",
    )
    p.add_argument(
        "--method-modes",
        default="compile",
        help="modes of the method rows: compile, eager, aoti (default: compile)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on a CPU"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--chunk-size", type=int, default=512, help="kvslim prefill chunk (tokens)")
    p.add_argument(
        "--compile-mode",
        help="torch.compile mode of the kvslim rows (default: "
        "reduce-overhead on a GPU, default on a CPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument(
        "--bandwidth-mib",
        type=int,
        help="size of the copy that measures bandwidth (default: 256 MiB on a CPU, 2048 on a GPU)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every cell in this process (faster; CPU peak memory then only "
        "approximate, as freed memory may be reused)",
    )
    p.add_argument("--cell-timeout", type=float, help="seconds per isolated cell (default: none)")
    p.add_argument(
        "--time-limit",
        type=float,
        help="start no cell after this many seconds; the rest are recorded as skipped",
    )
    p.add_argument("--tag", help="write benchmarks/results/decode-TAG.*")
    p.add_argument("--out", help="output path stem (overrides --tag)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.compile_mode = args.compile_mode or ("reduce-overhead" if cuda else "default")
    args.contexts = args.contexts or ("2048,8192,32768" if cuda else "512,2048,8192")
    args.bandwidth_mib = args.bandwidth_mib or (2048 if cuda else 256)
    try:
        args.context_list = [int(x) for x in args.contexts.split(",") if x.strip()]
        args.batch_list = [int(x) for x in args.batch.split(",") if x.strip()]
        budgets = parse_budgets(args.budgets, "--budgets")
        modes = [m.strip() for m in args.method_modes.split(",") if m.strip()]
        if set(modes) - {"eager", "compile", "aoti"}:
            raise ValueError(f"--method-modes takes eager, compile, aoti; got {modes}")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        from kvslim_fx.methods import METHODS, make_method, parse_spec
        from kvslim_fx.transform import TRANSFORM_OPTIONS

        unknown = [m for m in methods if m.split(":")[0] not in METHODS or m == "full"]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(set(METHODS) - {'full'})}")
        for spec in methods:  # a bad option fails now, not in a cell's process after the HF rows
            name, options = parse_spec(spec)
            make_method(name, **{k: v for k, v in options.items() if k not in TRANSFORM_OPTIONS})
        from kvslim_fx.storage import make_storage

        storages = tuple(x.strip() for x in args.storages.split(",") if x.strip())
        for storage in storages:
            make_storage(storage)
        weights = tuple(x.strip() for x in args.weights.split(",") if x.strip())
        if set(weights) - set(WEIGHT_TAGS):
            raise ValueError(f"--weights takes {', '.join(WEIGHT_TAGS)}; got {args.weights}")
        rows = all_rows(methods, budgets, modes, storages, weights)
        args.row_list = select_rows(rows, args.rows)
    except ValueError as err:
        p.error(str(err))
    if args.new_tokens < 1 or args.repeats < 1 or any(c < 1 for c in args.context_list):
        p.error("--new-tokens, --repeats and --contexts must be positive")
    stem = args.out or f"benchmarks/results/decode{'-' + args.tag if args.tag else ''}"
    args.out_stem = str(stem)
    return args


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM (a time-out) unwinds like Ctrl-C, so subprocess.run kills the running worker.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    signal.signal(signal.SIGTERM, _terminate)
    setup_torch(args)
    device = torch.device(args.device)
    if args.model != "tiny":
        from kvslim_fx.eval.default_model import resolve_model

        args.model = str(resolve_model(args.model))  # converts the default model once, here

    hf = None
    if args.in_process:
        preload()
        hf = load_model(
            args.model, DTYPES[args.dtype], device, max(args.context_list) + args.new_tokens
        )

    env = environment(args, device)
    out = Path(args.out_stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        k: v for k, v in vars(args).items() if _jsonable(v) and k not in ("worker", "out_stem")
    }
    results = {
        "settings": settings,
        "argv": sys.argv[1:] if argv is None else argv,
        "environment": env,
        "cells": [],
    }
    cells: list[dict] = results["cells"]
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    stop: str | None = None  # why no further cell runs
    for batch in args.batch_list:
        for context in args.context_list:
            for row in args.row_list:
                record = cell_record(row, context, batch, args)
                if deadline and time.monotonic() > deadline:
                    stop = stop or f"--time-limit {args.time_limit:g} s reached before this cell"
                reason = stop or skip_reason(row, context, args.new_tokens)
                if reason:
                    cells.append(record | {"status": "skipped", "reason": reason})
                    continue
                log(f"{row.name} context={context} batch={batch}...")
                try:
                    if args.in_process:
                        torch._dynamo.reset()  # a new model object each cell: no stale graphs
                        result = run_cell_safely(hf, row, context, batch, args)
                    else:
                        result = run_isolated(row, context, batch, args)
                except KeyboardInterrupt:
                    # Ctrl-C or SIGTERM: report what was measured, then exit 130.
                    stop = "interrupted"
                    cells.append(record | {"status": "skipped", "reason": stop})
                    log(f"{row.name} context={context} batch={batch}: interrupted")
                    continue
                cells.append(record | result)
                if result["status"] == "ok":
                    log(
                        f"{row.name} context={context} batch={batch}: prefill "
                        f"{result['prefill_s']:.2f} s, {result['tokens_per_s']:.1f} tok/s "
                        f"({result['repeats']} repeats; built and warmed up in "
                        f"{result['build_s']:.1f} s; {result['bandwidth_gbs']:.1f} GB/s)"
                    )
                else:
                    log(f"{row.name} context={context} batch={batch}: {result['error']}")
                # Saved after every cell: a run killed at a time limit keeps what it measured.
                save_results(out.with_suffix(".json"), results)

    add_ratios(cells)
    add_roofline(cells)
    save_results(out.with_suffix(".json"), results)
    text = table(cells)
    print(text)
    model_name = "tiny random Llama" if args.model == "tiny" else Path(args.model).name
    isolation = (
        "all cells in one process (peak RSS approximate)"
        if args.in_process
        else "each cell in its own process"
    )
    md = [
        "# Decode speed, memory and roofline",
        "",
        f"{model_name} ({args.dtype}) on {env['device']} ({args.device}, "
        f"{env['threads']} thread(s)), torch {env['torch']}, transformers {env['transformers']}, "
        f"commit {env['commit']}, {env['date']}. Random prompts of exactly `context` tokens, "
        f"then {args.new_tokens} timed greedy decode steps after warm-up, the whole run "
        f"(prefill and decode) repeated {args.repeats} times: a figure is the median over the "
        f"repeats (a repeat's step time: its median step), in brackets the repeats' min–max; "
        f"tokens/s = batch / median step. Peak memory: the cache held at the start of a timed "
        f"run plus the peak "
        f"{'CUDA allocation' if device.type == 'cuda' else 'RSS'} growth on top of it during "
        f"prefill and decode (weights and compiled code excluded), {isolation}. Cache: K/V bytes "
        f"(kvslim: with per-slot metadata, at capacity); % of an uncompressed cache of context "
        f"+ new tokens. Roofline: floor = bytes a decode step must read / bandwidth; the bytes "
        f"are every weight once as the row holds it (int8 weights (`-w8` rows): their codes and "
        f"scales; the output head, tied to the input embedding or not, read whole; an input "
        f"embedding only looked up is left out) plus the K/V of every occupied slot; GB/s is "
        f"measured in the row's own process at its thread count just before its timed runs (the "
        f"larger of a {args.bandwidth_mib} MiB copy, read + written, and a read of it); "
        f"roofline = floor / median step.",
        "",
        text,
        "",
        f"Command: `python benchmarks/decode.py {' '.join(results['argv'])}`",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    title = (
        f"{model_name}, {args.dtype}, {env['device']}, {env['threads']} thread(s), "
        f"{args.new_tokens} new tokens"
    )
    wrote = [out.with_suffix(".json"), out.with_suffix(".md")]
    if plot(cells, out.with_suffix(".png"), title):
        wrote.append(out.with_suffix(".png"))
    log("wrote " + ", ".join(map(str, wrote)))
    return 130 if stop == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
