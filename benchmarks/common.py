"""What every benchmark shares: its results file, progress lines, tables and K/V accounting.

A benchmark saves its results after every finished cell, atomically, so a kill loses at most
the cell in flight and a rerun skips what is done::

    results = load_results(path, {"cells": {}, "runs": []})
    results["cells"][key] = record
    save_results(path, results)
    log(f"{key}: done")                          # [12:34:56] ... on stderr
    print(markdown_table(frame, align="lrr"))    # frame: one column per table column

``token_digest`` and ``full_kv_bytes`` are the rules two benchmarks must apply alike to be
compared: the token ids both sides ran, and the size of an uncompressed cache.

The benchmarks run as scripts (``python benchmarks/quality.py``), which puts this folder first
on ``sys.path``, so they import this module as ``common``; the tests' conftest does the same.
"""

from __future__ import annotations

import array
import datetime as dt
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

ALIGN = {"l": "left", "r": "right"}


def log(msg: str) -> None:
    """``msg`` on stderr after the time of day, flushed at once (runs take hours)."""
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def load_results(path: Path, empty: dict) -> dict:
    """The results saved at ``path``, or ``empty`` when there are none yet."""
    if path.is_file():
        return json.loads(path.read_text())
    return empty


def save_results(path: Path, results: dict) -> None:
    """``results`` as JSON at ``path``, written beside it and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous, whole file


def markdown_table(frame: pd.DataFrame, align: str) -> str:
    """``frame`` as a markdown table under its column names, without the index.

    ``align`` has a letter per column, ``l`` or ``r``. Cells are printed as they are, so
    format numbers first: text that looks like a number is not parsed and reformatted.
    """
    colalign = [ALIGN[a] for a in align]
    return frame.to_markdown(index=False, colalign=colalign, disable_numparse=True)


def formatted(values: pd.Series, pattern: str, missing: str = "") -> pd.Series:
    """``values`` as text by the ``str.format`` ``pattern``, ``missing`` where one is absent."""
    return values.map(lambda v: missing if pd.isna(v) else pattern.format(v))


def token_digest(ids: Sequence[int]) -> str:
    """The first 16 hex digits of the SHA-1 of ``ids`` as int64s in native byte order.

    How benchmarks/quality.py matches the kvpress peer's rows to its own windows and cases:
    both sides digest the very token ids they ran.
    """
    return hashlib.sha1(array.array("q", ids).tobytes()).hexdigest()[:16]


def full_kv_bytes(config: Any, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of an uncompressed K/V cache of ``tokens`` tokens: K and V, every layer and KV head."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * batch * heads * head_dim * tokens * elem


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``cache`` as an HF model's forward takes it: keyword ``cache`` from transformers 5.24 on
    (which deprecates ``past_key_values``, to be removed in 5.40), ``past_key_values`` before."""
    takes_cache = "cache" in inspect.signature(model.forward).parameters
    return {"cache": cache} if takes_cache else {"past_key_values": cache}
