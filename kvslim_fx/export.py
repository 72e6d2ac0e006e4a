"""AOTInductor packages: ``export`` writes a ``.pt2`` serving prefill and decode; ``load`` runs it.

The package holds two compiled programs of the model's step, each taking the cache as inputs it
mutates in place: ``step`` (``[B, L]`` tokens, ``1 <= L <= chunk_size``, the length symbolic)
reads prompts, ``decode`` (``[B, 1]``, every shape static) generates. A static one-token step
takes the paths a compiled decode takes (the fused CPU attention, KVSlimmer's one-pair
selection), which a symbolic length rules out. The weights are stored once and shared by both
programs when loaded; metadata (method, options, state shapes) sits under the ``kvslim`` key.
The runner owns the cache tensors, resets them in place, feeds long prompts in chunks and sends
one-token steps to ``decode``.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

# torch 2.13 has no public call that packages several AOTI programs with shared weights and
# loads those weights (torch._inductor.package.load_package skips them); torch.export.save/load
# use these two functions themselves.
from torch.export.pt2_archive._package import load_pt2, package_pt2

from .errors import KVSlimError
from .generate import _core, generate
from .methods.base import non_negative
from .model import KVSlimModel, _new_token_mask, check_shapes, check_vocab

FORMAT = "kvslim_fx/3"
# The programs of a package, by name: any length up to the chunk, and one token.
PROGRAMS = ("step", "decode")


class _Step(nn.Module):
    """Export view of a model: its chunk step with the cache state passed in as inputs.

    The state tensors are mutated in place, like the model's own buffers. AOTInductor keeps
    input mutations but on torch 2.13 drops some mutations of its *constants* (a batch-1,
    one-token step left the cache unwritten), so the package holds only the weights.
    """

    def __init__(self, model: KVSlimModel) -> None:
        super().__init__()
        self.model = model
        self.names = list(model.state())

    def forward(self, input_ids: Tensor, valid: Tensor, *state: Tensor) -> Tensor:
        with torch.nn.utils.stateless._reparametrize_module(
            self.model, dict(zip(self.names, state, strict=True))
        ):
            return self.model.step(input_ids, valid)


def export(
    model,
    path: str | Path,
    *,
    batch_size: int = 1,
    max_length: int | None = None,
    prompt_len: int | None = None,
) -> Path:
    """Compile ``model``'s step with AOTInductor into the package ``path`` (``.pt2``): a general
    program for chunks of any length up to the model's chunk size and a static one-token decode
    program (see the module docstring), the weights stored once.

    The package serves ``batch_size`` rows and, for a ``full`` cache, sequences of up to
    ``max_length`` tokens (default: the model's positions); ``prompt_len`` fixes a fractional
    budget. Returns the package path.
    """
    core = _core(model)
    if not isinstance(core, KVSlimModel):
        raise KVSlimError(
            f"export takes a model from kvslim_fx.transform, got {type(core).__name__}"
        )
    hooked = sorted({layer.storage.name for layer in core.layers if layer.storage.has_prompt_hook})
    if hooked:
        raise KVSlimError(
            f"storage {hooked[0]!r} re-encodes the cache when the prompt ends, which runs eagerly "
            "and a package cannot run yet; decode it with torch.compile instead of exporting"
        )
    if core.prefill != "bounded":
        raise KVSlimError(
            f"export packages prefill='bounded' models, this one has prefill={core.prefill!r} "
            "(its end-of-prompt compression runs eagerly); transform with prefill='bounded' to "
            "export"
        )
    path = Path(path)
    if path.suffix != ".pt2":
        raise KVSlimError(f"a package's file name ends in .pt2, got {path.name!r}")
    core.reset(batch_size=batch_size, max_length=max_length, prompt_len=prompt_len)
    chunk = core.chunk_size
    buffers = core.state()
    meta = {
        "format": FORMAT,
        "method": core.method.name,
        "options": core.method.options(),
        "storage": core.layers[0].storage.name,
        "storage_options": core.layers[0].storage.options(),
        "layer_slots": core.layer_slots,
        "batch_size": batch_size,
        "chunk_size": chunk,
        "max_length": max_length or core.max_positions,
        "capacity": min(layer.capacity for layer in core.layers if not layer.layout.wraps)
        if any(not layer.layout.wraps for layer in core.layers)
        else None,
        "max_positions": core.max_positions,
        "cache_bytes": core.cache_bytes(),
        "device": str(core.device),
        "eos_token_id": core.eos_token_id,
        "pad_token_id": core.pad_token_id,
        "vocab_size": core.vocab_size,
        "state": [
            [name, list(buf.shape), str(buf.dtype).removeprefix("torch."), fill]
            for name, (buf, fill) in buffers.items()
        ],
    }
    options = {
        "aot_inductor.package": True,
        # Weights go into the archive as tensors, not into each program's library, so that
        # the package stores them once (deduplicated by storage) and both programs share them.
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": "pickle_weights",
        "aot_inductor.metadata": {"kvslim": json.dumps(meta)},
    }
    files = {}
    # A one-token chunk needs no general step: decode serves every call.
    for name in PROGRAMS if chunk > 1 else ("decode",):
        general = name == "step"
        example = torch.zeros(batch_size, 2 if general else 1, dtype=torch.long, device=core.device)
        dims = {1: torch.export.Dim("length", min=1, max=chunk)} if general else {}
        with torch.no_grad():
            ep = torch.export.export(
                _Step(core),
                (example, example.bool(), *(b.clone() for b, _ in buffers.values())),
                dynamic_shapes=(dims, dims, (None,) * len(buffers)),
                strict=False,
            )
            files[name] = torch._inductor.aot_compile(
                ep.module(check_guards=False), *ep.example_inputs, options=options
            )
        core.reset(batch_size=batch_size, max_length=max_length, prompt_len=prompt_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    package_pt2(path, aoti_files=files)
    return path


class Runner:
    """A loaded package: ``runner(input_ids, attention_mask)`` → logits; ``.generate`` → tokens."""

    def __init__(self, programs: dict, meta: dict) -> None:
        # One-token steps take the static decode program, the rest the general step.
        self._decode = programs["decode"]
        self._step = programs.get("step", self._decode)
        self.meta = meta
        self.chunk_size = int(meta["chunk_size"])
        self.batch_size = int(meta["batch_size"])
        self.device = torch.device(meta["device"])
        self.eos_token_id = meta["eos_token_id"]
        self.pad_token_id = meta["pad_token_id"]
        # Packages written before the key existed leave token ids unchecked.
        self.vocab_size = meta.get("vocab_size")
        # The runner owns the cache: the compiled step mutates these tensors in place.
        self.state = {
            name: (torch.full(shape, fill, dtype=getattr(torch, dtype), device=self.device), fill)
            for name, shape, dtype, fill in meta["state"]
        }

    def reset(
        self,
        batch_size: int | None = None,
        max_length: int | None = None,
        prompt_len: int | None = None,
    ) -> None:
        if batch_size is not None and batch_size != self.batch_size:
            raise KVSlimError(
                f"this package serves batch size {self.batch_size}, not {batch_size}; "
                f"re-export with kvslim_fx.export(model, path, batch_size={batch_size})"
            )
        limit = self.meta["capacity"] or self.meta["max_positions"]
        if max_length is not None and max_length > limit:
            raise KVSlimError(
                f"this package's cache holds {limit} tokens, not {max_length}; re-export with "
                f"kvslim_fx.export(model, path, max_length={max_length})"
            )
        for tensor, fill in self.state.values():
            tensor.fill_(fill)

    def end_prompt(self) -> None:
        """Nothing to do: packages hold the budget while they read the prompt."""

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, logits_to_keep: int = 0
    ) -> Tensor:
        """Logits ``[B, L, V]`` (the last ``logits_to_keep`` positions when > 0: a package's
        programs compute every position's, then slice)."""
        check_shapes(input_ids, attention_mask)
        non_negative("logits_to_keep", logits_to_keep)
        valid = _new_token_mask(input_ids, attention_mask)
        if input_ids.dtype != torch.long:
            raise KVSlimError(f"input_ids must be int64 token ids, got {input_ids.dtype}")
        # The compiled step would read outside its embedding table.
        check_vocab(input_ids, self.vocab_size)
        # The compiled step assumes contiguous inputs; a column slice of a prompt is not.
        state = [tensor for tensor, _ in self.state.values()]
        logits = []
        for i in range(0, input_ids.shape[1], self.chunk_size):
            ids = input_ids[:, i : i + self.chunk_size].contiguous()
            program = self._decode if ids.shape[1] == 1 else self._step
            logits.append(program(ids, valid[:, i : i + self.chunk_size].contiguous(), *state))
        return torch.cat(logits, dim=1)[:, -logits_to_keep:]

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        return generate(self, input_ids, attention_mask, **kwargs)


def load(path: str | Path) -> Runner:
    """Load a package written by :func:`export`; a corrupt or foreign file gets a clear error."""
    path = Path(path)
    if not path.is_file():
        raise KVSlimError(f"no package at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise KVSlimError(f"{path} is not an AOTInductor package ({err}); re-export it") from None
    if bad is not None:
        raise KVSlimError(f"{path} is corrupt (bad CRC in {bad}); re-export it")
    try:
        programs = load_pt2(path, load_weights_from_disk=True).aoti_runners
        meta = json.loads(programs["decode"].get_metadata()["kvslim"])
    except KeyError:
        raise KVSlimError(
            f"{path} is an AOTInductor package but not one this kvslim_fx wrote (packages of "
            f"format {FORMAT!r} hold the programs {', '.join(PROGRAMS)}); re-export it"
        ) from None
    except Exception as err:
        raise KVSlimError(f"{path} could not be loaded ({type(err).__name__}: {err})") from None
    if meta.get("format") != FORMAT:
        raise KVSlimError(f"{path} has package format {meta.get('format')!r}, expected {FORMAT!r}")
    return Runner(programs, meta)
