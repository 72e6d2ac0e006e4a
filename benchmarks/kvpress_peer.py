"""NVIDIA kvpress as a peer: its presses on the same model and the same prompts as kvslim_fx.

kvpress==0.5.5 needs transformers<5.3, so this script runs in its own environment, built by
``scripts/setup-kvpress``, which installs this checkout there too (without its dependencies), so
that budgets are parsed and answers scored by kvslim_fx's own code. It reads a tasks file
written by the main harness (token ids, so both sides see the same prompts token for token) and
writes one JSON row per (press, budget, task, item); finished rows are kept and skipped on a
rerun, so an interrupted run resumes. Two steps, one per venv: benchmarks/quality.py writes the
tasks file, this script scores it; quality.py then merges the rows into its tables and plot (it
reads ``kvpress.json`` beside its output, matching rows to its windows and cases by id and token
digest). quality.py's docstring has every command, from ``scripts/setup-kvpress`` to the merging
rerun; this script's step::

    .venv-kvpress/bin/python benchmarks/kvpress_peer.py \\
        --tasks benchmarks/results/kvpress_tasks.json \\
        --presses none,streaming,snapkv,tova,knorm,expected_attention,merging_tova,\\
merging_expected_attention,cam \\
        --budgets 0.125,0.25,0.5 --threads 1 --out benchmarks/results/kvpress.json

``quality.py --write-cases`` takes the same settings as its sweep (``--context``,
``--continuation``, ``--windows``, ``--lengths``, ``--depths``, ``--samples``, ``--seed``) and
writes exactly the windows and cases the sweep scores (``kvslim_fx.eval.case_file.write_cases``;
``kvslim-fx eval --export-cases`` writes the same schema). Add ``--task perplexity`` etc. to
split the peer run; rerunning skips the finished rows. The 8k perplexity windows take about
1-2 min a row on 1 thread.

Tasks file: ``{"model": str, "perplexity": [{"id", "context": [ids], "continuation": [ids]}],
"needle": [{"id", "length", "depth", "prompt": [ids], "answer": str}], "retrieval": [same]}``;
any list may be missing or empty. Each row records ``tokens_sha1``, the ``common.token_digest``
of the ids, which benchmarks/quality.py records as ``window_sha1`` / ``prompt_sha1``, and the
``dtype``.

How kvpress compresses, and so what the numbers mean:

* Prefill presses (all but ``cam``) compress **once, at the end of prefill**: a forward hook after
  each attention layer prunes that layer's cache, so the prefill's own attention still sees the
  whole context (its last logit is the uncompressed model's, so the first continuation token
  is scored as with no press). The prefill is one forward pass, not chunked. The continuation
  is then teacher-forced one token at a time through the compressed cache with no press, and
  the cache grows by one slot per token (kvpress does not compress during decoding). Token
  ``C + j`` is predicted by the logit of token ``C + j - 1``, the first one by the last prefill
  logit, as ``kvslim_fx.eval.perplexity.continuation_nll``; decode steps pass the true position ids
  (the cache is shorter than the text), as kvpress's pipeline does.
* ``cam`` (CaM) is kvpress's decoding press: the prefill keeps everything, then every decode step
  merges the evicted values into their kept neighbours to hold ``round(budget * prompt)`` slots.
  Its hook too runs after attention, so the first *two* continuation (or answer) tokens are
  predicted from the whole cache; its merges are random (``--seed`` makes a rerun identical).
* Needle / retrieval: the whole prompt (question included) is prefilled with the press, then
  greedy decoding of ``len(answer) + 3`` tokens (or ``--max-new-tokens``); correct iff the first
  number in the decoded text is the answer, as the main harness scores it (``contains_answer``,
  the answer anywhere in the text, is recorded too).

``--presses`` names: ``none`` (no press, one cell at budget 1: the reference; its Δ vs ``full``
in benchmarks/quality.py's table checks these loops against kvslim_fx), ``streaming``,
``snapkv``, ``tova``, ``knorm``, ``expected_attention`` (kvpress's defaults for each), any of the
last five as ``merging_<name>`` (kvpress's MergingPress around it), and ``cam``. The budget is the
fraction of the prompt kept: ``compression_ratio = 1 - budget``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from common import (
    cache_kwargs,
    full_kv_bytes,
    load_results,
    log,
    markdown_table,
    save_results,
    token_digest,
)

from kvslim_fx.budget import parse_budgets
from kvslim_fx.errors import KVSlimError
from kvslim_fx.eval.answers import exact_match
from kvslim_fx.eval.default_model import default_model_dir

TASKS = ("perplexity", "needle", "retrieval")
# Our name -> kvpress ScorerPress class name; each is used with kvpress's own defaults.
SCORERS = {
    "streaming": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "tova": "TOVAPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
}
MERGING = "merging_"
DECODING = ("cam",)
NONE = "none"
PRESSES = (NONE, *SCORERS, *(MERGING + s for s in SCORERS), *DECODING)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CAM_BASE = "tova"  # CaM scores by attention; TOVA is kvpress's last-query attention scorer
COMPRESSION_NOTE = (
    "kvpress compresses the KV cache once, at the end of prefill (a hook after each attention "
    "layer; the prefill's own attention sees the whole prompt, unchunked); the continuation or "
    "answer is then decoded through the compressed cache with no press, the cache growing by one "
    "slot per token. Exception: cam is a decoding press (no compression at prefill, then every "
    "decode step merges down to the budget)."
)


# ---------------------------------------------------------------------------------------------
# Pure python: names, tasks, rows (tested without kvpress).


def parse_presses(text: str) -> list[str]:
    """Comma-separated press names, validated (no kvpress import needed)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESSES]
    if unknown:
        raise ValueError(f"unknown presses {unknown}; known: {sorted(PRESSES)}")
    return list(dict.fromkeys(names))


def parse_fractions(text: str) -> list[float]:
    """``--budgets``: kvslim_fx's budgets, but only fractions below 1 (kvpress compresses by
    ``compression_ratio = 1 - budget``, so it takes no slot counts, and 1 is ``none``)."""
    budgets = parse_budgets(text, "--budgets")
    if not all(isinstance(b, float) and b < 1 for b in budgets):
        raise KVSlimError(
            f"--budgets are fractions of the prompt below 1 for kvpress (e.g. 0.25 or 25%), "
            f"got {text!r}; the uncompressed reference is the press `none`"
        )
    return budgets


def compression_ratio(budget: float) -> float:
    # Rounded: 1 - 0.1 is 0.9000000000000000222, and the ratio lands in keys and the table.
    return round(1.0 - budget, 12)


def cells(presses: list[str], budgets: list[float]) -> list[tuple[str, float]]:
    """(press, budget fraction) pairs; ``none`` is a single cell at budget 1."""
    return [
        (p, 1.0) if p == NONE else (p, b)
        for p in presses
        for b in ([1.0] if p == NONE else budgets)
    ]


def load_tasks(path: Path, only: list[str] | None = None) -> dict[str, list[dict]]:
    """The task lists of a tasks file (missing lists are empty), checked for the fields used."""
    data = json.loads(Path(path).read_text())
    need = {
        "perplexity": ("id", "context", "continuation"),
        "needle": ("id", "prompt", "answer"),
        "retrieval": ("id", "prompt", "answer"),
    }
    tasks: dict[str, list[dict]] = {}
    for task in only or TASKS:
        items = data.get(task) or []
        for item in items:
            missing = [k for k in need[task] if k not in item]
            if missing:
                raise ValueError(f"{path}: a {task} item lacks {missing}: {str(item)[:80]}")
        ids = [str(item["id"]) for item in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: {task} ids are not unique")
        tasks[task] = items
    tasks["_model"] = data.get("model")  # type: ignore[assignment]
    return tasks


def item_digest(task: str, item: dict) -> str:
    """Digest of what the model sees (token ids, answer): a changed item is a new cell."""
    keys = ("context", "continuation") if task == "perplexity" else ("prompt", "answer")
    blob = json.dumps([item[k] for k in keys], separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def tokens_digest(task: str, item: dict) -> str:
    """benchmarks/quality.py's ``digest`` of the same ids (the whole window, or the prompt): how
    it matches these rows to its own windows and cases, token for token."""
    ids = item["context"] + item["continuation"] if task == "perplexity" else item["prompt"]
    return token_digest(ids)


def row_key(press: str, budget: float, task: str, item_id: str, digest: str, dtype: str) -> str:
    return f"{press}|budget={budget:g}|{task}|{item_id}|{digest}|{dtype}"


def contains_answer(output: str, answer: str) -> bool:
    """The looser metric, kept beside it: the answer string appears anywhere in ``output``."""
    return answer.strip() in output


def answer_tokens(answer: str, max_new_tokens: int | None) -> int:
    """Tokens to generate: ``max_new_tokens``, or the main harness's ``len(answer) + 3``."""
    return max_new_tokens if max_new_tokens is not None else len(answer) + 3


def summarize(rows: list[dict]) -> pd.DataFrame:
    """One line per (task, press, budget_fraction), in that order: the items' mean perplexity
    (``exp`` of each item's mean NLL) or accuracy, cache bytes and seconds."""
    keys = ["task", "press", "budget_fraction"]
    inputs = [*keys, "nll", "correct", "cache_bytes", "full_cache_bytes", "prefill_s", "decode_s"]
    frame = pd.DataFrame(rows).reindex(columns=inputs)  # a task absent: its column all NaN
    frame = frame.assign(
        seconds=frame.prefill_s + frame.decode_s,
        perplexity=frame.nll.map(lambda nll: math.exp(statistics.fmean(nll)), na_action="ignore"),
        accuracy=frame.correct.astype(float),
    )
    frame = frame.sort_values(keys, key=_rank, kind="stable")
    return (
        frame.groupby(keys, sort=False)
        .agg(
            items=("task", "size"),
            cache_bytes=("cache_bytes", "mean"),
            full_cache_bytes=("full_cache_bytes", "mean"),
            seconds=("seconds", "mean"),
            perplexity=("perplexity", "mean"),
            accuracy=("accuracy", "mean"),
        )
        .reset_index()
    )


def _rank(column: pd.Series) -> pd.Series:
    """Sort keys: tasks and presses in their declared order (unknown presses last)."""
    order = {"task": TASKS, "press": PRESSES}.get(str(column.name))
    if order is None:
        return column
    return column.map(lambda v: order.index(v) if v in order else len(order))


def table(summary: pd.DataFrame) -> str:
    """:func:`summarize`'s lines as markdown."""
    accuracy = (100 * summary.accuracy).map("{:.0f}%".format)
    columns = {
        "press": summary.press,
        "budget": summary.budget_fraction.map("{:g}".format),
        "task": summary.task,
        "items": summary["items"],
        "cache kept": (summary.cache_bytes / 2**20).map("{:.2f} MiB".format),
        "% of full": (100 * summary.cache_bytes / summary.full_cache_bytes).map("{:.1f}%".format),
        "perplexity / accuracy": summary.perplexity.map("{:.3f}".format).where(
            summary.perplexity.notna(), accuracy
        ),
        "s / item": summary.seconds.map("{:.1f}".format),
    }
    return markdown_table(pd.DataFrame(columns), align="lrlrrrrr")


# ---------------------------------------------------------------------------------------------
# Model side (plain transformers: runs with any press-like context manager, or none).

PressFn = Callable[[Any], contextlib.AbstractContextManager] | None


def _press_context(press: PressFn, model: Any) -> contextlib.AbstractContextManager:
    return press(model) if press is not None else contextlib.nullcontext()


def cache_bytes(cache: Any) -> tuple[int, int]:
    """``(bytes, slots of layer 0)`` of the K and V tensors a DynamicCache holds now."""
    total, slots = 0, 0
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None:
            continue
        total += keys.nbytes + values.nbytes
        if i == 0:
            slots = keys.shape[-2]
    return total, slots


def _info(start: float, prefill_s: float, kept: tuple[int, int], cache: Any) -> dict:
    end = cache_bytes(cache)
    return {
        "prefill_s": prefill_s,
        "decode_s": time.perf_counter() - start - prefill_s,
        "cache_bytes_prefill": kept[0],
        "cache_slots_prefill": kept[1],
        # Prefill presses: grown by one slot per fed token since; cam: held at the budget.
        "cache_bytes_end": end[0],
        "cache_slots_end": end[1],
    }


def _prefill(model: Any, ids: list[int], press: PressFn) -> tuple[Any, torch.Tensor]:
    """One forward pass over ``ids`` with ``press`` active: the new cache and the last logits."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with _press_context(press, model):
        # logits_to_keep=1: only the last prefill logit is used ([C, vocab] fp32 is 1.6 GB at 8k).
        out = model(
            input_ids=torch.tensor([ids], device=next(model.parameters()).device),
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1,
        )
    return cache, out.logits[:, -1]


def _step(model: Any, token: int, cache: Any, position: int, device: torch.device) -> torch.Tensor:
    # position_ids: after compression the cache is shorter than the text, and HF would otherwise
    # derive the new token's RoPE position from the cache length.
    out = model(
        input_ids=torch.tensor([[token]], device=device),
        **cache_kwargs(model, cache),
        position_ids=torch.tensor([[position]], device=device),
        use_cache=True,
    )
    return out.logits[:, -1]


@torch.no_grad()
def continuation_nll(
    model: Any,
    context: list[int],
    continuation: list[int],
    prefill_press: PressFn = None,
    decode_press: PressFn = None,
) -> tuple[torch.Tensor, dict]:
    """Per-token NLL ``[len(continuation)]`` (float32), and timings and cache bytes after prefill.

    ``prefill_press`` is active during the one-pass prefill of ``context``, ``decode_press``
    while the continuation is teacher-forced one token per call (the last one is never fed).
    """
    device = next(model.parameters()).device
    start = time.perf_counter()
    cache, last = _prefill(model, context, prefill_press)
    prefill_s = time.perf_counter() - start
    kept = cache_bytes(cache)
    nll = []
    with _press_context(decode_press, model):
        for j, token in enumerate(continuation):
            # float32 log_softmax: a bf16 model's logits would lose the NLL's small differences.
            nll.append(-torch.log_softmax(last.float(), dim=-1)[0, token])
            if j + 1 < len(continuation):
                last = _step(model, token, cache, len(context) + j, device)
    info = _info(start, prefill_s, kept, cache)
    return torch.stack(nll).cpu(), info


@torch.no_grad()
def greedy_decode(
    model: Any,
    prompt: list[int],
    max_new_tokens: int,
    eos: set[int],
    prefill_press: PressFn = None,
    decode_press: PressFn = None,
) -> tuple[list[int], dict]:
    """Greedy token ids after ``prompt`` (stopping after an EOS id), and timings and cache bytes."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    cache, last = _prefill(model, prompt, prefill_press)
    prefill_s = time.perf_counter() - start
    kept = cache_bytes(cache)
    out: list[int] = []
    with _press_context(decode_press, model):
        while True:
            token = int(last[0].argmax())
            out.append(token)
            if token in eos or len(out) >= max_new_tokens:
                break
            last = _step(model, token, cache, len(prompt) + len(out) - 1, device)
    info = _info(start, prefill_s, kept, cache)
    return out, info


# ---------------------------------------------------------------------------------------------
# kvpress side.


def make_press(name: str, budget: float, prompt_len: int) -> tuple[PressFn, PressFn]:
    """``(prefill_press, decode_press)`` for one cell; kvpress is imported only here."""
    if name == NONE:
        return None, None
    import kvpress

    ratio = compression_ratio(budget)
    if name in SCORERS:
        return getattr(kvpress, SCORERS[name])(compression_ratio=ratio), None
    if name.startswith(MERGING):
        inner = getattr(kvpress, SCORERS[name.removeprefix(MERGING)])(compression_ratio=ratio)
        return kvpress.MergingPress(press=inner), None
    if name == "cam":
        # Every step (interval 1), so the cache holds the budget from the first decode step on,
        # as a decode-time kvslim_fx method would; target = the same slots as the other presses.
        press = kvpress.CAMPress(
            base_press=getattr(kvpress, SCORERS[CAM_BASE])(),
            compression_interval=1,
            target_size=max(1, round(budget * prompt_len)),
        )
        return None, press
    raise ValueError(f"unknown press {name!r}")


def load_model(path: Path, dtype: torch.dtype) -> Any:
    """The checkpoint at ``path`` under this venv's transformers (older than kvslim_fx's).

    The folder is written by transformers 5.x; a 4.x would ignore its ``rope_parameters`` and
    silently fall back to RoPE base 10000, so the base is carried over here, at load time.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((path / "config.json").read_text())
    config = AutoConfig.from_pretrained(path)
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope and not hasattr(config, "rope_parameters"):
        config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = dict(rope)
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, attn_implementation="sdpa", **kw
    )
    return model.eval()


def metadata(args: argparse.Namespace, model: Any) -> dict:
    from importlib.metadata import version

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "kvpress": version("kvpress"),
        "transformers": version("transformers"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": str(args.model),
        "tasks": str(args.tasks),
        "tasks_sha1": hashlib.sha1(Path(args.tasks).read_bytes()).hexdigest()[:16],
        "dtype": args.dtype,
        "attn_implementation": model.config._attn_implementation,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "compression": COMPRESSION_NOTE,
    }


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoTokenizer

    tasks = load_tasks(args.tasks, args.tasks_only)
    log(f"loading {args.model} ({args.dtype})")
    model = load_model(args.model, DTYPES[args.dtype])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    out = Path(args.out)
    results = load_results(out, {"meta": {}, "runs": [], "rows": []})
    results["meta"] = metadata(args, model)
    results["runs"].append(results["meta"])
    done = {r["key"] for r in results["rows"]}
    dtype = DTYPES[args.dtype]

    for press_name, budget in cells(args.presses, args.budgets):
        for task in TASKS:
            for item in tasks.get(task, []):
                digest = item_digest(task, item)
                key = row_key(press_name, budget, task, str(item["id"]), digest, args.dtype)
                if key in done:
                    continue
                prompt = item["context"] if task == "perplexity" else item["prompt"]
                prefill_press, decode_press = make_press(press_name, budget, len(prompt))
                # cam draws its merges at random (torch.bernoulli): seeded per row to rerun alike.
                torch.manual_seed(args.seed)
                row: dict[str, Any] = {
                    "key": key,
                    "press": press_name,
                    "budget_fraction": budget,
                    "compression_ratio": 0.0 if press_name == NONE else compression_ratio(budget),
                    "task": task,
                    "id": str(item["id"]),
                    "item_sha1": digest,
                    "tokens_sha1": tokens_digest(task, item),
                    "dtype": args.dtype,
                    "prompt_tokens": len(prompt),
                    "phase": "decode" if decode_press is not None else "prefill",
                    "press_repr": repr(decode_press or prefill_press),
                }
                if task == "perplexity":
                    nll, info = continuation_nll(
                        model, prompt, item["continuation"], prefill_press, decode_press
                    )
                    row["nll"] = [round(float(x), 6) for x in nll]
                    row["mean_nll"] = float(nll.double().mean())
                    row["perplexity"] = math.exp(row["mean_nll"])
                    full_tokens = len(prompt)
                    msg = f"ppl {row['perplexity']:.3f}"
                else:
                    ids, info = greedy_decode(
                        model,
                        prompt,
                        answer_tokens(item["answer"], args.max_new_tokens),
                        eos_ids,
                        prefill_press,
                        decode_press,
                    )
                    row["output"] = tokenizer.decode(ids, skip_special_tokens=True)
                    row["answer"] = item["answer"]
                    row["correct"] = exact_match(row["output"], item["answer"])
                    row["contains_answer"] = contains_answer(row["output"], item["answer"])
                    for extra in ("length", "depth"):
                        if extra in item:
                            row[extra] = item[extra]
                    full_tokens = len(prompt)
                    msg = f"{'correct' if row['correct'] else 'wrong'}: {row['output']!r}"
                row |= info
                # The bytes the press holds the cache to: after prefill for a prefill press, at
                # the end for cam (which only compresses while decoding).
                decoding = decode_press is not None
                row["cache_bytes"] = info["cache_bytes_end" if decoding else "cache_bytes_prefill"]
                row["cache_slots"] = info["cache_slots_end" if decoding else "cache_slots_prefill"]
                row["full_cache_bytes"] = full_kv_bytes(model.config, full_tokens, dtype)
                row["threads"] = torch.get_num_threads()
                row["date"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
                results["rows"].append(row)
                done.add(key)
                save_results(out, results)
                log(
                    f"{press_name} budget={budget:g} {task} {item['id']}: {msg} "
                    f"({info['prefill_s']:.1f} + {info['decode_s']:.1f} s, "
                    f"{row['cache_slots']} slots kept)"
                )
    save_results(out, results)
    wanted = {(p, b) for p, b in cells(args.presses, args.budgets)}
    rows = [r for r in results["rows"] if (r["press"], r["budget_fraction"]) in wanted]
    print(table(summarize(rows)))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tasks",
        type=Path,
        required=True,
        help="tasks JSON from the main harness (benchmarks/quality.py --write-cases)",
    )
    p.add_argument("--model", type=Path, default=default_model_dir(), help="HF checkpoint folder")
    p.add_argument("--presses", default="none,streaming,snapkv,tova,knorm,expected_attention")
    p.add_argument(
        "--budgets",
        default="0.25",
        help="fractions of the prompt kept (0.25 or 25%%), comma-separated",
    )
    p.add_argument("--task", dest="tasks_only", action="append", choices=TASKS, help="only these")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="greedy answer length (len(answer) + 3)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="torch seed set before each row")
    p.add_argument("--out", default="benchmarks/results/kvpress.json", help="results JSON")
    args = p.parse_args(argv)
    try:
        args.presses = parse_presses(args.presses)
        args.budgets = parse_fractions(args.budgets)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
