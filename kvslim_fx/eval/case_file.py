"""The evaluation cases as token ids in one JSON file, so a peer harness runs the same prompts.

A harness in another environment (kvpress's, say) reads the file instead of rebuilding prompts
with its own code, so both score exactly the same token sequences::

    write_cases("cases.json", "smollm2", windows, context, needle_cases(tok), retrieval_cases(tok))
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ..errors import KVSlimError
from .haystack import Case


def write_cases(
    path: str | os.PathLike[str],
    model: str,
    windows: Sequence[Tensor],
    context: int,
    needle: Sequence[Case],
    retrieval: Sequence[Case],
) -> Path:
    """Write every case of the three tasks to ``path`` as JSON; returns the path.

    Schema (all token ids are plain ints of ``model``'s tokenizer, no special tokens added
    beyond what the ids hold)::

        {
          "model": str,                   # the model the ids belong to
          "perplexity": [                 # from perplexity.austen_windows
            {"id": "window-0",
             "context": [int, ...],       # prefill these ...
             "continuation": [int, ...]}  # ... then score these, teacher-forced one at a time
          ],
          "needle": [                     # from haystack.needle_cases
            {"id": "needle-1024-0.1-0",
             "length": int,               # == len(prompt)
             "depth": float,              # requested needle depth in [0, 1]
             "prompt": [int, ...],        # generate greedily after these ...
             "answer": str}               # ... correct iff the first number generated == answer
          ],
          "retrieval": [ ... ]            # from haystack.retrieval_cases, same fields as needle
        }

    ``windows`` are ``[1, N]`` tensors whose first ``context`` ids are the context.
    """
    perplexity = []
    for i, window in enumerate(windows):
        ids = window.reshape(-1).tolist()
        if not 0 < context < len(ids):
            raise KVSlimError(
                f"window {i} has {len(ids)} tokens, too few for a {context}-token context "
                f"and a continuation; pass the context the windows were drawn with"
            )
        perplexity.append(
            {"id": f"window-{i}", "context": ids[:context], "continuation": ids[context:]}
        )
    doc = {
        "model": model,
        "perplexity": perplexity,
        "needle": [_case(c) for c in needle],
        "retrieval": [_case(c) for c in retrieval],
    }
    path = Path(path)
    path.write_text(json.dumps(doc) + "\n")
    return path


def _case(case: Case) -> dict:
    return {
        "id": case.id,
        "length": case.length,
        "depth": case.depth,
        "prompt": list(case.prompt),
        "answer": case.answer,
    }
