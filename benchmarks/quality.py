"""Quality of each method on Jane Austen with the default model, against the cache bytes kept.

Three tasks (``--tasks``), every (method, budget) cell computed through the compressed cache:

* ``perplexity``: prefill ``--context`` tokens of a novel, teacher-force the next
  ``--continuation`` tokens one at a time (decode-time compression active) and record the
  per-token NLL. ``full`` is the reference (it reproduces the original model; ``--check``
  verifies that against one HF forward pass).
* ``needle``: a pass key hidden at each of ``--depths`` of ``--lengths``-token prompts
  (:mod:`kvslim_fx.eval.haystack`), answered greedily; exact match.
* ``retrieval``: four people's secret numbers hidden in the text, one of them asked for.

::

    python benchmarks/quality.py --tasks perplexity,needle,retrieval \\
        --methods full,streaming,kvslimmer --budgets 0.125,0.25,0.5,1024

NVIDIA kvpress's presses join the same tables and plot as ``kvpress:<press>`` rows, scored on the
same token ids. Two steps, one per venv (kvpress needs an older transformers): write this sweep's
windows and cases (same settings as the sweep: seed, context, continuation, windows, lengths,
depths, samples), run the peer on them, then rerun the sweep; it reads ``kvpress.json`` beside
``OUT`` (or ``--peer FILE``) and keeps only the rows whose id and token digest match its own::

    scripts/setup-kvpress
    .venv/bin/python benchmarks/quality.py --tasks perplexity,needle,retrieval \\
        --write-cases benchmarks/results/kvpress_tasks.json
    .venv-kvpress/bin/python benchmarks/kvpress_peer.py \\
        --tasks benchmarks/results/kvpress_tasks.json \\
        --presses none,streaming,snapkv,tova,knorm,expected_attention,merging_tova,\\
merging_expected_attention,cam \\
        --budgets 0.125,0.25,0.5 --threads 1 --out benchmarks/results/kvpress.json
    .venv/bin/python benchmarks/quality.py --tasks perplexity,needle,retrieval \\
        --methods full,streaming,kvslimmer --budgets 0.125,0.25,0.5

(the markdown then states these commands with its own settings).

Why 8064 + 128 for perplexity: SmolLM2-135M has 8192 positions and the window must fit them, so
the longest context that leaves a 128-token continuation is 8192 - 128 = 8064.

Budgets (``kvslim_fx.budget``): a number with a decimal point, or a percentage, is a fraction of
the prompt, so every method is compared at the same cache size: of the perplexity context
(``round(frac * context)`` slots, e.g. 0.25 → 2016) and of each needle/retrieval prompt; an
integer is a fixed number of slots per layer.
``full`` ignores them. Writes ``OUT.json`` (every per-window and per-case number, settings,
versions), ``OUT.md`` (a table per task, and the command that regenerates them) and ``OUT.png``
(quality against cache bytes, a panel per task). Finished cells are kept in ``OUT.json`` and
skipped on a rerun with the same settings, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from common import formatted, load_results, log, markdown_table, save_results, token_digest

from kvslim_fx.budget import Budget, parse_budgets
from kvslim_fx.errors import KVSlimError
from kvslim_fx.eval.answers import answer_case, answer_tokens
from kvslim_fx.eval.case_file import write_cases
from kvslim_fx.eval.default_model import load_default_model
from kvslim_fx.eval.haystack import Case, needle_cases, retrieval_cases
from kvslim_fx.eval.perplexity import (
    austen_passage,
    austen_windows,
    continuation_nll,
    perplexity,
    reference_nll,
)
from kvslim_fx.methods import METHODS, make_method, parse_spec
from kvslim_fx.transform import TRANSFORM_OPTIONS, transform

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASKS = ("perplexity", "needle", "retrieval")
CASE_BUILDERS = {"needle": needle_cases, "retrieval": retrieval_cases}
SHORT = {"perplexity": "ppl", "needle": "needle", "retrieval": "retrieval"}
TITLES = {
    "perplexity": "Continuation perplexity",
    "needle": "Needle in a haystack",
    "retrieval": "Retrieval (four keys, one asked)",
}
# The script a results file's command runs: one that registers more methods sets its own.
SCRIPT = "benchmarks/quality.py"
OUT = "benchmarks/results/quality"
# A spec option (lorc:...:calibrate=1024): fit the storage on that many held-out tokens.
CALIBRATE = "calibrate"
PEER = "kvpress.json"  # the peer's results, beside OUT unless --peer says otherwise
PEER_TASKS = "kvpress_tasks.json"  # the cases written for it, beside OUT
PEER_PREFIX = "kvpress:"
# Used when the peer's metadata carries no note of its own (its COMPRESSION_NOTE).
PEER_CAVEATS = (
    "kvpress compresses once, at the end of prefill (its prefill attends over the whole "
    "uncompressed prompt, in one pass); the continuation or answer is then decoded through the "
    "compressed cache, which grows by one slot per token."
)
# Per-window (perplexity) and per-case records: the columns their table rows are made of.
MEANS = ("cache_bytes", "cache_bytes_end", "full_cache_bytes", "seconds")
WINDOW_FIELDS = ["method", "budget", "budget_slots", "budget_frac", "window", "perplexity"]
WINDOW_FIELDS += [*MEANS, "prefill_s", "decode_s", "merges", "fallbacks", "threads"]
# The largest slot (tokens merged into one) after the prompt and at the end, and its 99th
# percentile over the slots: the diagnostics that make a collapsed merge schedule visible.
SLOT_FIELDS = ["largest_prompt", "p99_prompt", "largest_end", "p99_end"]
WINDOW_FIELDS += SLOT_FIELDS
# Perplexity differences to this method, at the same budget and on the same windows.
BASELINE = "streaming"
BOOTSTRAP = 10_000
# Rows whose cache bytes differ by more than this are not "equal bytes".
EQUAL_BYTES = 0.10
CASE_FIELDS = ["method", "budget", "length", "correct", *MEANS, "threads"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, of " + str(TASKS))
    p.add_argument("--context", type=int, default=8064, help="perplexity: prefilled tokens")
    p.add_argument("--continuation", type=int, default=128, help="perplexity: tokens scored")
    p.add_argument("--windows", type=int, default=2, help="perplexity: Austen windows per cell")
    p.add_argument("--lengths", default="1024,2048,4096,7168", help="needle/retrieval tokens")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle/retrieval depths")
    p.add_argument("--samples", type=int, default=1, help="cases per (length, depth)")
    p.add_argument("--methods", default="full,streaming,kvslimmer")
    p.add_argument(
        "--budgets",
        default="0.125,0.25,0.5",
        help="comma-separated fractions of the prompt (0.25 or 25%%) and/or slots per layer (1024)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0, help="window and case seed")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk (tokens)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is much faster on cores shared with "
        "other jobs, where every small op of a decode step waits for a descheduled thread",
    )
    p.add_argument(
        "--equal-bytes",
        default="",
        metavar="METHODS",
        help="comma-separated methods (e.g. streaming,snapkv): pair each other row with each "
        f"one's row of the nearest cache bytes (within {EQUAL_BYTES:.0%}%), paired over windows",
    )
    p.add_argument("--out", default=OUT, help="output path stem")
    p.add_argument(
        "--peer",
        default=None,
        metavar="FILE",
        help=f"kvpress peer results (benchmarks/kvpress_peer.py) to merge into the tables and plot "
        f"as {PEER_PREFIX}<press> rows; default: {PEER} beside OUT, if it exists",
    )
    p.add_argument(
        "--write-cases",
        default=None,
        metavar="FILE",
        help="instead of scoring, write the token ids of --tasks' windows and cases (these "
        "settings) to FILE for benchmarks/kvpress_peer.py, then exit",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only check that full's NLL equals one HF forward pass on each window, then exit",
    )
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or any(t not in TASKS for t in args.tasks):
        p.error(f"--tasks are comma-separated, of {', '.join(TASKS)}; got {args.tasks}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.equal_bytes = [m.strip() for m in args.equal_bytes.split(",") if m.strip()]
    for spec in args.methods:
        try:
            name, options = parse_spec(spec)
            make_method(name, **method_options(options))
        except KVSlimError as err:
            p.error(f"--methods {spec}: {err}")
    try:
        args.budgets = parse_budgets(args.budgets, "--budgets")
        args.lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
        args.depths = [float(d) for d in args.depths.split(",") if d.strip()]
    except ValueError as err:
        p.error(str(err))
    # Checked now, not after hours of cells; --write-cases comes before the peer has run.
    if args.peer and not args.write_cases and not Path(args.peer).is_file():
        p.error(f"--peer {args.peer}: no such file")
    return args


def budget_label(budget: Budget) -> str:
    return "all" if budget is None else f"{budget:g}"


def method_order(label: str) -> tuple[int, str]:
    """Registry order, a method's option variants after it, peers (not registered) last."""
    names = list(METHODS)
    name = label.split(":")[0]
    return (names.index(name) if name in names else len(names), label)


def budget_order(label: str) -> tuple[int, float]:
    """full first, then fractions, then fixed slot counts, each ascending."""
    if label == "all":
        return (0, 0.0)
    return (1, float(label)) if "." in label else (2, float(label))


# --- results file ---


def cell_task(cell: dict) -> str:
    # Cells written before the needle and retrieval tasks existed are perplexity cells.
    return cell.get("task", "perplexity")


def cell_budget(cell: dict) -> str:
    """The budget as asked for; older perplexity cells stored only the fraction and slots."""
    if "budget" in cell:
        return cell["budget"]
    frac, slots = cell["budget_frac"], cell["budget_slots"]
    return budget_label(frac if frac is not None else slots)


def stamp(record: dict, model, args: argparse.Namespace) -> dict:
    """What every cell records besides its numbers: how and when it was computed."""
    return record | {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": record.get("settings", {})
        | {
            "dtype": args.dtype,
            "seed": args.seed,
            "chunk_size": args.chunk_size,
            "options": model.method.options(),
        },
    }


# --- perplexity ---


def cell_key(method: str, slots: int | None, args: argparse.Namespace, window: int) -> str:
    # dtype and seed too: a cell computed in bf16 or on other windows is not the same cell.
    return (
        f"{method}|budget={slots if slots is not None else 'all'}|context={args.context}"
        f"|continuation={args.continuation}|window={window}|dtype={args.dtype}|seed={args.seed}"
    )


def run_check(hf, windows: list[torch.Tensor], args: argparse.Namespace) -> int:
    """full's continuation NLL vs the HF model's own, in one forward pass, per window."""
    model = transform(hf, "full", chunk_size=args.chunk_size)
    worst = 0.0
    for i, window in enumerate(windows):
        nll = continuation_nll(model, window, args.context)
        ref = reference_nll(hf, window, args.context)
        tok_rel = float(((nll - ref).abs() / ref.abs().clamp_min(1e-6)).max())
        mean_rel = abs(float(nll.double().mean() / ref.double().mean()) - 1)
        ppl, ref_ppl = perplexity(nll), perplexity(ref)
        print(
            f"window {i}: ppl full {ppl:.6f} vs HF {ref_ppl:.6f}; mean-NLL rel err {mean_rel:.2e}; "
            f"max |ΔNLL| {float((nll - ref).abs().max()):.2e}; max per-token rel err {tok_rel:.2e}"
        )
        worst = max(worst, mean_rel)
    ok = worst < 1e-4
    print(f"check {'passed' if ok else 'FAILED'}: worst mean-NLL relative error {worst:.2e}")
    return 0 if ok else 1


def run_window(model, window: torch.Tensor, args: argparse.Namespace) -> dict:
    timings: dict[str, float] = {}
    diagnostics: dict[str, list] = {}
    nll = continuation_nll(model, window, args.context, timings=timings, diagnostics=diagnostics)
    record = {
        "nll": [round(float(x), 6) for x in nll],
        "mean_nll": float(nll.double().mean()),
        "perplexity": perplexity(nll),
        "cache_bytes": model.cache_bytes(),
        "peak_cache_bytes": model.peak_cache_bytes,
        "full_cache_bytes": model.full_cache_bytes(args.context + args.continuation),
        "capacity": model.layers[0].capacity,
        "prefill_s": timings["prefill_s"],
        "decode_s": timings["decode_s"],
        "seconds": timings["prefill_s"] + timings["decode_s"],
        # Per layer, after the prompt and at the end: occupancy, largest slots, merge counts.
        "diagnostics": diagnostics,
    }
    if model.layers[0].layout.merges:
        # Per layer [merges done, closed-form fallbacks to the score-weighted mean].
        record["merge_stats"] = [[float(x) for x in layer.merge_stats] for layer in model.layers]
    return record


def run_perplexity(hf, tokenizer, args: argparse.Namespace, results: dict, path: Path) -> None:
    windows = austen_windows(tokenizer, args.context, args.continuation, args.windows, args.seed)
    digests = [token_digest(w[0].tolist()) for w in windows]
    for method, budget in cells_to_run(args):
        slots = budget if not isinstance(budget, float) else round(budget * args.context)
        keys = [cell_key(method, slots, args, i) for i in range(args.windows)]
        todo = [
            i
            for i, key in enumerate(keys)
            if results["cells"].get(key, {}).get("window_sha1") != digests[i]
        ]
        label = f"perplexity {method} budget={slots if slots is not None else 'all'}"
        if not todo:
            log(f"{label}: all {args.windows} windows done, skipped")
            continue
        model = timed_transform(hf, method, slots, args, label, tokenizer, windows)
        for i in todo:
            log(f"{label}: window {i + 1}/{args.windows}...")
            record = run_window(model, windows[i], args)
            record |= {
                "task": "perplexity",
                "method": method,
                "budget": budget_label(budget),
                "budget_frac": budget if isinstance(budget, float) else None,
                "budget_slots": slots,
                "window": i,
                "window_sha1": digests[i],
                "window_text": tokenizer.decode(windows[i][0, args.context - 24 :])[:200],
                "settings": {"context": args.context, "continuation": args.continuation},
            }
            results["cells"][keys[i]] = stamp(record, model, args)
            save_results(path, results)
            extra = ""
            if "merge_stats" in record:
                merges = sum(s[0] for s in record["merge_stats"])
                fallbacks = sum(s[1] for s in record["merge_stats"])
                extra = f", merges {merges:.0f} (fallbacks {fallbacks:.0f})"
            log(
                f"{label}: window {i + 1}: ppl {record['perplexity']:.3f} in "
                f"{record['seconds']:.1f} s (prefill {record['prefill_s']:.1f} s){extra}"
            )
        del model


def perplexity_cells(results: dict, args: argparse.Namespace) -> list[dict]:
    """The finished perplexity cells of the requested windows and settings."""
    wanted = (args.context, args.continuation, args.dtype, args.seed)
    return [
        cell
        for cell in results["cells"].values()
        if cell_task(cell) == "perplexity"
        and cell["window"] < args.windows
        and tuple(cell["settings"][k] for k in ("context", "continuation", "dtype", "seed"))
        == wanted
    ]


def perplexity_records(cells: list[dict]) -> pd.DataFrame:
    """Our perplexity cells as table records, in the table's order: methods in registry order,
    budgets by slots (full's none first), then windows."""
    records = pd.DataFrame(cells).assign(
        budget=[cell_budget(c) for c in cells],
        # Summed over layers: [merges done, closed-form fallbacks to the score-weighted mean].
        merges=[_layer_sum(c, 0) for c in cells],
        fallbacks=[_layer_sum(c, 1) for c in cells],
        **{
            f"{stat}_{when}": [_layer_max(c, when, f"{stat}_slot") for c in cells]
            for when in ("prompt", "end")
            for stat in ("largest", "p99")
        },
        # object: a cell without a count (None) must not turn the others into floats.
        threads=pd.Series([c.get("threads") for c in cells], dtype=object),
    )
    return records.sort_values(["method", "budget_slots", "window"], key=_order, kind="stable")


def _layer_sum(cell: dict, stat: int) -> float | None:
    stats = cell.get("merge_stats")
    return None if stats is None else sum(layer[stat] for layer in stats)


def _layer_max(cell: dict, when: str, stat: str) -> float | None:
    layers = cell.get("diagnostics", {}).get(when)
    return None if not layers else max(layer[stat] for layer in layers)


def paired_interval(diffs: pd.Series) -> tuple[float, float, float] | None:
    """Mean of per-window differences and its 95 % bootstrap interval (windows resampled)."""
    d = diffs.dropna().to_numpy()
    if len(d) < 2:
        return None
    means = np.random.default_rng(0).choice(d, size=(BOOTSTRAP, len(d))).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(low), float(high)


def baseline_perplexity(cells: list[dict]) -> pd.Series:
    """:data:`BASELINE`'s perplexity by (budget label, window), from our cells."""
    base = [c for c in cells if c["method"] == BASELINE]
    index = pd.MultiIndex.from_tuples(
        [(cell_budget(c), c["window"]) for c in base], names=["budget", "window"]
    )
    return pd.Series([c["perplexity"] for c in base], index=index, dtype=float)


def perplexity_rows(
    records: pd.DataFrame,
    by: list[str],
    full: pd.Series,
    base: pd.Series,
    windows: int,
    ours: pd.Series | None = None,
) -> pd.DataFrame:
    """A table row per ``by`` group of per-window ``records``, in their order: mean perplexity,
    each window's, Δ vs ``full`` (full's perplexity by window) over the windows both have, the
    paired log-perplexity difference to :data:`BASELINE` (``base``, by budget and window) with
    its bootstrap interval (and, for a row over another storage, to the same method's dense
    row in ``ours``, by method, budget and window), the means of cache bytes, seconds and
    merges, and the largest slots."""
    records = records.reindex(columns=WINDOW_FIELDS)
    keys = pd.MultiIndex.from_arrays([records.budget, records.window])
    twins = pd.MultiIndex.from_arrays([records.method.map(dense_twin), records.budget,
                                       records.window])  # fmt: skip
    dense = np.nan if ours is None else ours.reindex(twins).to_numpy()
    records = records.assign(
        delta=records.perplexity - records.window.map(full),
        log_ratio=np.log(records.perplexity.to_numpy()) - np.log(base.reindex(keys).to_numpy()),
        log_ratio_dense=np.log(records.perplexity.to_numpy()) - np.log(dense),
    )
    means = ["prefill_s", "decode_s", "merges", "fallbacks", *MEANS]
    rows = records.groupby(by, sort=False, dropna=False).agg(
        **{key: (key, "first") for key in ("method", "budget", "budget_slots", "budget_frac")},
        windows=("window", "size"),
        quality=("perplexity", "mean"),
        per_window=("perplexity", list),
        delta_vs_full=("delta", "mean"),
        vs_baseline=("log_ratio", paired_interval),
        vs_dense=("log_ratio_dense", paired_interval),
        **{key: (key, "mean") for key in means},
        **{key: (key, "max") for key in SLOT_FIELDS},
        threads=("threads", _distinct),
    )
    return rows.reset_index(drop=True).assign(complete=lambda r: r.windows == windows)


def _distinct(values: pd.Series) -> list:
    return sorted(set(values), key=str)


def coverage(n: int, of: int) -> str:
    """``n`` windows or cases, saying so when it is fewer than the table's ``of``."""
    return f"{n}" if n == of else f"{n} of {of}"


def bytes_kept(rows: pd.DataFrame) -> pd.Series:
    """Cache bytes in MiB, and ``→ end`` where the cache grew while decoding (a kvpress prefill
    press compresses once: its cache then grows a slot per decoded token)."""
    grew = rows.cache_bytes_end.where(rows.cache_bytes_end != rows.cache_bytes)
    return formatted(rows.cache_bytes / 2**20, "{:.1f} MiB") + formatted(grew / 2**20, " → {:.1f}")


def percent_of_full(rows: pd.DataFrame) -> pd.Series:
    return formatted(100 * rows.cache_bytes / rows.full_cache_bytes, "{:.1f}%")


def perplexity_table(rows: pd.DataFrame, windows: int) -> str:
    seconds = formatted(rows.seconds, "{:.1f}") + formatted(rows.prefill_s, " ({:.1f}")
    columns = {
        "method": rows.method,
        "budget (slots)": formatted(rows.budget_slots, "{:.0f}", "all")
        + formatted(rows.budget_frac, " ({:g})"),
        "windows": rows.windows.map(lambda n: coverage(n, windows)),
        "cache bytes kept": bytes_kept(rows),
        "% of full": percent_of_full(rows),
        "perplexity": formatted(rows.quality, "{:.3f}"),
        "Δ vs full": formatted(rows.delta_vs_full, "{:+.3f}"),
        f"vs {BASELINE} (95 % CI)": rows.vs_baseline.map(_percent_interval),
        "vs dense (95 % CI)": rows.vs_dense.map(_percent_interval),
        "largest slot (p99): prompt → end": formatted(rows.largest_prompt, "{:.0f}")
        + formatted(rows.p99_prompt, " ({:.0f})")
        + formatted(rows.largest_end, " → {:.0f}")
        + formatted(rows.p99_end, " ({:.0f})"),
        "per window": rows.per_window.map(lambda ppl: ", ".join(f"{p:.3f}" for p in ppl)),
        "s / window (prefill + decode)": seconds + formatted(rows.decode_s, " + {:.1f})"),
    }
    align = "lrrrrrrrrrlr"
    if not columns["vs dense (95 % CI)"].astype(bool).any():  # no row over another storage
        del columns["vs dense (95 % CI)"]
        align = align[:8] + align[9:]
    return markdown_table(pd.DataFrame(columns), align=align)


def equal_bytes_table(tables: dict[str, pd.DataFrame], against: list[str]) -> str:
    """Each complete perplexity row of ours against, for each method of ``against``, its complete
    row of the nearest cache bytes (within :data:`EQUAL_BYTES`): the paired log-perplexity
    difference over windows with its bootstrap interval, and both rows' needle and retrieval
    accuracy at those budgets."""
    ppl = tables["perplexity"]
    ppl = ppl[ppl.complete & ~ppl.method.map(is_peer)]
    accuracy = {SHORT[task]: rows.set_index(["method", "budget"]).quality
                for task, rows in tables.items() if task != "perplexity"}  # fmt: skip
    lines = []
    for row in ppl[~ppl.method.isin(against)].itertuples():
        line = {"method": row.method, "budget": row.budget,
                "% of full": f"{100 * row.cache_bytes / row.full_cache_bytes:.1f}%"}  # fmt: skip
        for other in against:
            rows = ppl[ppl.method == other]
            gap = np.log(rows.cache_bytes / row.cache_bytes).abs()
            if rows.empty or gap.min() > math.log1p(EQUAL_BYTES):
                continue
            match = rows.loc[gap.idxmin()]
            diffs = pd.Series(np.log(row.per_window) - np.log(match.per_window))
            share = 100 * match.cache_bytes / match.full_cache_bytes
            line[f"{other} at"] = f"{match.budget} ({share:.1f}%)"
            line[f"ppl vs {other} (95 % CI)"] = _percent_interval(paired_interval(diffs))
            for task, acc in accuracy.items():
                pair = [acc.get((m, b)) for m, b in ((row.method, row.budget),
                                                     (other, match.budget))]  # fmt: skip
                if pair != [None, None]:
                    line[f"{task}: vs {other}"] = " / ".join(
                        "" if a is None else f"{100 * a:.0f}%" for a in pair
                    )
        lines.append(line)
    frame = pd.DataFrame(lines).fillna("")
    return markdown_table(frame, align="ll" + "r" * (frame.shape[1] - 2))


def _percent_interval(interval: tuple[float, float, float] | None) -> str:
    """A mean log-perplexity difference as a perplexity change in percent, ``[low, high]``."""
    if not isinstance(interval, tuple):
        return ""
    mean, low, high = (100 * math.expm1(x) for x in interval)
    return f"{mean:+.2f}% [{low:+.2f}, {high:+.2f}]"


# --- needle and retrieval ---


def case_key(task: str, method: str, budget: Budget, case: Case, args) -> str:
    return (
        f"{task}|{method}|budget={budget_label(budget)}|case={case.id}"
        f"|dtype={args.dtype}|seed={args.seed}"
    )


def run_cases(hf, tokenizer, task: str, args: argparse.Namespace, results: dict, path: Path):
    cases = CASE_BUILDERS[task](
        tokenizer, args.lengths, args.depths, samples=args.samples, seed=args.seed
    )
    digests = {case.id: token_digest(case.prompt) for case in cases}
    for method, budget in cells_to_run(args):
        keys = {case.id: case_key(task, method, budget, case, args) for case in cases}
        todo = [
            case
            for case in cases
            if results["cells"].get(keys[case.id], {}).get("prompt_sha1") != digests[case.id]
        ]
        label = f"{task} {method} budget={budget_label(budget)}"
        if not todo:
            log(f"{label}: all {len(cases)} cases done, skipped")
            continue
        prompts = [torch.tensor(case.prompt) for case in cases]
        model = timed_transform(hf, method, budget, args, label, tokenizer, prompts)
        for n, case in enumerate(todo, 1):
            answer = answer_case(model, tokenizer, case)
            record = dataclasses.asdict(answer) | {
                "method": method,
                "budget": budget_label(budget),
                "sample": case.sample,
                "prompt_sha1": digests[case.id],
                "full_cache_bytes": model.full_cache_bytes(case.length + answer_tokens(case)),
                "capacity": model.layers[0].capacity,
            }
            results["cells"][keys[case.id]] = stamp(record, model, args)
            save_results(path, results)
            log(
                f"{label}: {n}/{len(todo)} {case.id}: {answer.output!r} "
                f"{'right' if answer.correct else 'wrong'} ({answer.answer}) "
                f"in {answer.seconds:.1f} s"
            )
        del model


def grid_size(args: argparse.Namespace) -> int:
    return len(args.lengths) * len(args.depths) * args.samples


def case_cells(results: dict, args: argparse.Namespace, task: str) -> list[dict]:
    """The finished cells of ``task`` on the requested grid and settings."""
    return [
        cell
        for cell in results["cells"].values()
        if cell_task(cell) == task
        and (cell["settings"]["dtype"], cell["settings"]["seed"]) == (args.dtype, args.seed)
        and cell["length"] in args.lengths
        and cell["depth"] in args.depths
        and cell["sample"] < args.samples
    ]


def case_records(cells: list[dict]) -> pd.DataFrame:
    """Our needle or retrieval cells as table records, methods in registry order, then budgets
    (full first, then fractions, then fixed slots, each ascending)."""
    return pd.DataFrame(cells).sort_values(["method", "budget"], key=_order, kind="stable")


def accuracy_rows(records: pd.DataFrame, size: int) -> pd.DataFrame:
    """A table row per (method, budget) of per-case ``records``, in their order: the accuracy,
    overall and per prompt length (a column per length), and the means of bytes and seconds."""
    records = records.reindex(columns=CASE_FIELDS)
    keys = ["method", "budget"]
    rows = records.groupby(keys, sort=False).agg(
        cases=("correct", "size"),
        quality=("correct", "mean"),
        **{key: (key, "mean") for key in MEANS},
        threads=("threads", _distinct),
    )
    per_length = records.pivot_table("correct", keys, "length", "mean", sort=False)
    return rows.join(per_length).reset_index().assign(complete=lambda r: r.cases == size)


def accuracy_table(rows: pd.DataFrame, lengths: list[int], size: int) -> str:
    per_length = rows.reindex(columns=lengths)
    columns = {
        "method": rows.method,
        "budget": rows.budget,
        "cases": rows.cases.map(lambda n: coverage(n, size)),
        "cache bytes kept (mean)": bytes_kept(rows),
        "% of full": percent_of_full(rows),
        "accuracy": formatted(100 * rows.quality, "{:.1f}%"),
        **{f"{n} tokens": formatted(100 * per_length[n], "{:.0f}%") for n in lengths},
        "s / case": formatted(rows.seconds, "{:.1f}"),
    }
    return markdown_table(pd.DataFrame(columns), align="lrrrrr" + "r" * len(lengths) + "r")


def _order(column: pd.Series) -> pd.Series:
    """``sort_values`` key of the tables' rows: methods by ``method_order``, budget labels by
    ``budget_order``, slot counts ascending (full's none first)."""
    if column.name == "method":
        return column.map(method_order)
    if column.name == "budget":
        return column.map(budget_order)
    if column.name == "budget_slots":
        return column.fillna(0)
    return column


# --- kvpress peer ---


def load_peer(args: argparse.Namespace) -> dict | None:
    """The peer's results (``meta``, ``rows``) and their ``path``; None when there are none."""
    path = Path(args.peer) if args.peer else Path(args.out).with_name(PEER)
    if not path.is_file():
        return None
    return json.loads(path.read_text()) | {"path": str(path)}


def write_peer_cases(hf, tokenizer, args: argparse.Namespace) -> Path:
    """The windows and cases of ``--tasks`` as this sweep builds them, for the peer to score."""
    windows = (
        austen_windows(tokenizer, args.context, args.continuation, args.windows, args.seed)
        if "perplexity" in args.tasks
        else []
    )
    cases = {
        task: build(tokenizer, args.lengths, args.depths, samples=args.samples, seed=args.seed)
        if task in args.tasks
        else []
        for task, build in CASE_BUILDERS.items()
    }
    path = Path(args.write_cases)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_cases(path, hf.config.name_or_path, windows, args.context, **cases)


def peer_records(peer: dict, task: str, matches: set[tuple[str, str]], dtype: str) -> pd.DataFrame:
    """The peer's rows of ``task`` whose ``(id, token digest)`` is in ``matches`` as table
    records, presses in the order the peer ran them (its --presses), budgets ascending.

    The digest pins the very token ids, so a tasks file written with other settings (another
    seed or length, same ids) contributes nothing. Rows without one predate it and are left out.
    """
    rows = [
        row
        for row in peer["rows"]
        if row["task"] == task
        and row.get("dtype") == dtype
        and (row["id"], row.get("tokens_sha1")) in matches
    ]
    if not rows:
        return pd.DataFrame()
    presses = list(dict.fromkeys(r["press"] for r in peer["rows"]))
    records = pd.DataFrame(rows)
    return records.assign(
        method=PEER_PREFIX + records.press,
        budget=records.budget_fraction.map("{:g}".format),
        budget_frac=records.budget_fraction,
        budget_slots=records.cache_slots,
        seconds=records.prefill_s + records.decode_s,
        rank=records.press.map(presses.index),
    ).sort_values(["rank", "budget_frac"], kind="stable")


def peer_perplexity_rows(
    peer: dict, cells: list[dict], full: pd.Series, base: pd.Series, args: argparse.Namespace
) -> pd.DataFrame:
    """Perplexity rows of the peer over the windows of ``cells`` (this table's)."""
    matches = {(f"window-{c['window']}", c["window_sha1"]) for c in cells}
    records = peer_records(peer, "perplexity", matches, args.dtype)
    if records.empty:
        return records
    records = records.assign(
        window=records.id.str.removeprefix("window-").astype(int),
        perplexity=records.nll.map(lambda nll: math.exp(statistics.fmean(nll))),
    ).sort_values(["rank", "budget_frac", "window"], kind="stable")
    return perplexity_rows(records, ["method", "budget"], full, base, args.windows)


def peer_case_rows(
    peer: dict, cells: list[dict], args: argparse.Namespace, task: str
) -> pd.DataFrame:
    """Needle or retrieval rows of the peer over the cases of ``cells`` (this table's)."""
    matches = {(c["id"], c["prompt_sha1"]) for c in cells}
    records = peer_records(peer, task, matches, args.dtype)
    return records if records.empty else accuracy_rows(records, grid_size(args))


def peer_commands(args: argparse.Namespace, tables: dict[str, pd.DataFrame], peer: dict) -> str:
    """The two steps that recompute the peer's rows of ``tables``, then the merging rerun."""
    rows = all_rows(tables, peer=True)
    meta = peer["meta"]
    tasks = meta.get("tasks") or str(Path(args.out).with_name(PEER_TASKS))
    presses = dict.fromkeys(rows.method.str.removeprefix(PEER_PREFIX))
    # `none` runs at budget 1, whatever --budgets says; the others take fractions below 1.
    budgets = sorted(set(rows.budget) - {"1"}, key=float)
    argv = [".venv-kvpress/bin/python", "benchmarks/kvpress_peer.py", "--tasks", tasks]
    argv += ["--presses", ",".join(presses)] + (["--budgets", ",".join(budgets)] if budgets else [])
    argv += ["--dtype", args.dtype]
    for flag, key in (
        ("--max-new-tokens", "max_new_tokens"),
        ("--seed", "seed"),
        ("--threads", "threads"),
    ):
        argv += [flag, str(meta[key])] if meta.get(key) is not None else []
    argv += ["--out", peer["path"]]
    rerun = command(args, tables, python=".venv/bin/python")
    return "\n".join([f"{rerun} --write-cases {shlex.quote(tasks)}", shlex.join(argv), rerun])


def is_peer(method: str) -> bool:
    return method.startswith(PEER_PREFIX)


def all_rows(tables: dict[str, pd.DataFrame], peer: bool) -> pd.DataFrame:
    """The rows of every table that are the peer's (``peer``), or ours."""
    rows = pd.concat(tables.values(), ignore_index=True)
    return rows[rows.method.map(is_peer) == peer]


def build_tables(
    results: dict, args: argparse.Namespace, peer: dict | None
) -> dict[str, pd.DataFrame]:
    """Every task with finished cells for these settings, the peer's matching rows after them."""
    tables = {}
    cells = perplexity_cells(results, args)
    if cells:
        full = pd.Series({c["window"]: c["perplexity"] for c in cells if c["method"] == "full"})
        base = baseline_perplexity(cells)
        ours = pd.Series({(c["method"], cell_budget(c), c["window"]): c["perplexity"]
                          for c in cells})  # fmt: skip
        records = perplexity_records(cells)
        rows = [perplexity_rows(records, ["method", "budget_slots"], full, base, args.windows,
                                ours)]  # fmt: skip
        rows += [peer_perplexity_rows(peer, cells, full, base, args)] if peer else []
        tables["perplexity"] = _concat(rows)
    for task in CASE_BUILDERS:
        cells = case_cells(results, args, task)
        if cells:
            rows = [accuracy_rows(case_records(cells), grid_size(args))]
            rows += [peer_case_rows(peer, cells, args, task)] if peer else []
            tables[task] = _concat(rows)
    return tables


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    # An empty frame (no peer rows) has no columns: concatenated, it could change dtypes.
    return pd.concat([f for f in frames if not f.empty], ignore_index=True)


# --- shared ---


def cells_to_run(args: argparse.Namespace) -> list[tuple[str, Budget]]:
    """(method, budget) pairs in order; full runs once, without a budget."""
    return [
        (method, budget)
        for method in args.methods
        for budget in ([None] if method.split(":")[0] == "full" else args.budgets)
    ]


def method_options(options: dict) -> dict:
    """A spec's options that are the method's (not transform's, not the storage's, not the
    calibration's)."""
    return {k: v for k, v in options.items()
            if k not in (*TRANSFORM_OPTIONS, CALIBRATE) and "." not in k}  # fmt: skip


def transform_options(options: dict) -> dict:
    """A spec's options for ``transform``: ``storage=int8:storage.group=16`` → the storage spec
    ``int8:group=16`` (a spec's own separator is the colon, so a storage's options carry the
    ``storage.`` prefix), the method's options as they are."""
    extra = [f"{k.removeprefix('storage.')}={v}" for k, v in options.items() if "." in k]
    rest = {k: v for k, v in options.items() if "." not in k and k != CALIBRATE}
    if extra:
        rest["storage"] = ":".join([str(options.get("storage", "dense")), *extra])
    return rest


def dense_twin(label: str) -> str | None:
    """The same method spec over the dense storage, for a spec that names another storage
    (its rows get a paired ``vs dense`` column); None for a dense one or a peer."""
    if is_peer(label):
        return None
    _, options = parse_spec(label)
    if str(options.get("storage", "dense")) == "dense":
        return None
    parts = label.split(":")
    return ":".join(p for p in parts if not p.startswith(("storage", f"{CALIBRATE}=")))


def timed_transform(hf, method: str, budget: Budget, args: argparse.Namespace, label: str,
                    tokenizer, measured: list[torch.Tensor]):  # fmt: skip
    """``transform`` by the spec; ``calibrate=N`` then fits the storage on ``N`` Austen tokens
    that share no 16-token run with ``measured`` (the windows or prompts the cells score)."""
    start = time.perf_counter()
    name, options = parse_spec(method)
    model = transform(hf, name, budget, chunk_size=args.chunk_size, **transform_options(options))
    if CALIBRATE in options:
        model.calibrate(austen_passage(tokenizer, int(options[CALIBRATE]), measured))
    log(f"{label}: transformed in {time.perf_counter() - start:.1f} s")
    return model


def _threads_note(rows: pd.DataFrame) -> str:
    counts = {t for threads in rows.threads for t in threads}
    if len(counts) == 1:
        return f"{counts.pop()} CPU thread(s)"
    per_row = "; ".join(
        f"{method} {budget}: {'/'.join(map(str, threads))}"
        for method, budget, threads in zip(rows.method, rows.budget, rows.threads, strict=True)
    )
    return f"CPU threads per cell (not the same for all rows, compare timings with care): {per_row}"


def command(
    args: argparse.Namespace, tables: dict[str, pd.DataFrame], python: str = "python"
) -> str:
    """The command line that computes every kvslim row of ``tables`` (rerunning none that is
    done) and merges the peer's."""
    rows = all_rows(tables, peer=False)
    methods = list(dict.fromkeys(rows.method))
    budgets = sorted(set(rows.budget) - {"all"}, key=budget_order)
    argv = [python, SCRIPT, "--tasks", ",".join(tables)]
    argv += ["--methods", ",".join(methods)] + (["--budgets", ",".join(budgets)] if budgets else [])
    if "perplexity" in tables:
        argv += ["--context", str(args.context), "--continuation", str(args.continuation)]
        argv += ["--windows", str(args.windows)]
    if tables.keys() - {"perplexity"}:
        argv += ["--lengths", ",".join(map(str, args.lengths))]
        argv += ["--depths", ",".join(f"{d:g}" for d in args.depths)]
        argv += ["--samples", str(args.samples)]
    argv += ["--dtype", args.dtype, "--seed", str(args.seed), "--chunk-size", str(args.chunk_size)]
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--equal-bytes", ",".join(args.equal_bytes)] if args.equal_bytes else []
    argv += ["--out", args.out] if args.out != OUT else []
    argv += ["--peer", args.peer] if args.peer else []
    return shlex.join(argv)


def markdown(args: argparse.Namespace, tables: dict[str, pd.DataFrame], peer: dict | None) -> str:
    md = [
        "# Quality of compressed KV caches",
        "",
        f"SmolLM2-135M-Instruct ({args.dtype}) on Jane Austen's novels, torch "
        f"{torch.__version__}. Budget = KV slots per layer: a fraction of each prompt, or a "
        "fixed number of slots. Cache bytes: K, V and per-slot metadata at capacity, against "
        "an uncompressed cache of the same sequence. Regenerate (finished cells are read back "
        "from the JSON beside this file, only missing ones are computed):",
        "",
        "```bash",
        command(args, tables),
        "```",
        "",
    ]
    if peer and not all_rows(tables, peer=True).empty:
        meta = peer["meta"]
        source = [f"{k} {meta[k]}" for k in ("kvpress", "transformers", "torch") if k in meta]
        source += [f"`{peer['path']}`", "`benchmarks/kvpress_peer.py`"]
        md += [
            f"`{PEER_PREFIX}<press>` rows: NVIDIA kvpress's presses ({', '.join(source)}) on the "
            "same token ids, each row over only the windows or cases whose id and token digest "
            "match this table's (fewer than the table's are shown as *n of N*, and such rows "
            f"stay off the plot). {meta.get('compression', PEER_CAVEATS)} So its cache bytes are "
            "K and V only, no per-slot metadata, as held after prefill (→ at the end of "
            "decoding, grown by the decoded tokens), and its % of full is against its own "
            "uncompressed K/V of the prompt; its seconds are another harness's (HF, unchunked "
            "prefill). Regenerate in two steps, one per venv (the cases with the main venv, the "
            "peer with `.venv-kvpress` from `scripts/setup-kvpress`), then rerun this script "
            "to merge:",
            "",
            "```bash",
            peer_commands(args, tables, peer),
            "```",
            "",
        ]
    md += [
        "## Summary",
        "",
        "Perplexity (lower is better) and accuracy per budget; the tables below have the "
        "details (cache bytes, per window, per length, seconds).",
        "",
        summary(tables),
        "",
    ]
    for task, rows in tables.items():
        md += [f"## {TITLES[task]}", ""]
        if task == "perplexity":
            md += [
                f"{args.windows} window(s) of {args.context} context + {args.continuation} "
                f"teacher-forced tokens (seed {args.seed}), decoded one token at a time. "
                f"Perplexity: mean over windows; Δ vs full over the same windows. Seconds: wall "
                f"time, {_threads_note(rows)}.",
                "",
                perplexity_table(rows, args.windows),
                "",
            ]
            if args.equal_bytes:
                md += [
                    f"At equal cache bytes: each row against the row of "
                    f"{', '.join(args.equal_bytes)} whose bytes are nearest (within "
                    f"{EQUAL_BYTES:.0%}; none: blank), the perplexity ratio paired over the "
                    f"windows with its 95 % bootstrap interval, and both rows' accuracies (ours / "
                    f"theirs).",
                    "",
                    equal_bytes_table(tables, args.equal_bytes),
                    "",
                ]
            merged = rows[rows.merges.notna()]
            if not merged.empty:
                md += [
                    "Tokens merged or dropped (per KV head, summed over layers, mean over "
                    "windows), and fallbacks (KVSlimmer's closed form or WeightedKV's fold "
                    "weights replaced by a weighted mean):",
                    "",
                ]
                md += [
                    f"- {r.method} {r.budget_slots:.0f}: {r.merges:.0f} merged or dropped, "
                    f"{r.fallbacks:.0f} fallbacks"
                    for r in merged.itertuples()
                ]
                md.append("")
        else:
            hidden = "a pass key" if task == "needle" else "the asked one of four secret numbers"
            md += [
                f"Prompts of {', '.join(map(str, args.lengths))} tokens with {hidden} at depths "
                f"{', '.join(f'{d:g}' for d in args.depths)} ({args.samples} case(s) per cell, "
                f"seed {args.seed}; `kvslim_fx.eval.haystack`), answered greedily; right when the "
                f"first number generated is the hidden one. Seconds: wall time per case, "
                f"{_threads_note(rows)}.",
                "",
                accuracy_table(rows, args.lengths, grid_size(args)),
                "",
            ]
    return "\n".join(md)


def summary(tables: dict[str, pd.DataFrame]) -> str:
    """Every method's quality per task and budget, one row per method (what the README shows).

    Perplexity is the mean over the windows, needle and retrieval the accuracy; an uncompressed
    row (``full``, the peer's ``none``) fills the "uncompressed" column. Only complete rows.
    """
    rows = pd.concat([r.assign(task=task) for task, r in tables.items()], ignore_index=True)
    rows = rows[rows.complete]
    uncompressed = rows.method.isin(["full", PEER_PREFIX + "none"])
    rows = rows.assign(
        column=rows.budget.where(~uncompressed, "all"),
        value=formatted(rows.quality, "{:.2f}").where(
            rows.task == "perplexity", formatted(100 * rows.quality, "{:.0f}%")
        ),
    )
    wide = rows.pivot_table("value", "method", ["task", "column"], "first", sort=False)
    budgets = sorted(set(rows.column) - {"all"}, key=budget_order)
    columns = [(t, b) for t in tables for b in ["all", *budgets] if (t, b) in wide.columns]
    wide = wide.reindex(columns=columns).fillna("")
    wide.columns = [f"{SHORT[t]} {'uncompressed' if b == 'all' else b}" for t, b in columns]
    return markdown_table(wide.reset_index(), align="l" + "r" * len(columns))


def plot(tables: dict[str, pd.DataFrame], path: Path) -> bool:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    width = max(6.4, 5.2 * len(tables))
    fig, axes = plt.subplots(1, len(tables), figsize=(width, 4.4), squeeze=False)
    for ax, (task, rows) in zip(axes[0], tables.items(), strict=True):
        # A mean over part of the windows or cases is not comparable: partial rows stay off.
        rows = rows[rows.complete]
        scale = 1 if task == "perplexity" else 100
        points = rows.assign(mib=rows.cache_bytes / 2**20, y=scale * rows.quality)
        for method, group in points.groupby("method", sort=False):
            pts = group.sort_values(["mib", "y"])
            if method == "full":
                ax.axhline(pts.y.iloc[0], color="gray", ls="--", lw=1)
                ax.plot(pts.mib, pts.y, "k*", ms=10, label="full")
            elif is_peer(method):
                ax.plot(pts.mib, pts.y, "s:", mfc="none", label=method)
            else:
                ax.plot(pts.mib, pts.y, "o-", label=method)
        ax.set_xscale("log")
        # Plain MiB numbers on the log axis, not 6x10^0-style ticks.
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("KV cache bytes kept (MiB, log scale)")
        if task == "perplexity":
            ax.set_ylabel("perplexity (lower is better)")
        else:
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(-5, 105)
        ax.set_title(TITLES[task], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct on Jane Austen: quality against cache bytes", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"loading the default model ({args.dtype})")
    hf, tokenizer = load_default_model(DTYPES[args.dtype])
    max_pos = hf.config.max_position_embeddings
    if "perplexity" in args.tasks and args.context + args.continuation > max_pos:
        sys.exit(
            f"context + continuation = {args.context + args.continuation} exceeds the model's "
            f"{max_pos} positions; e.g. --context {max_pos - args.continuation}"
        )
    if args.check:
        windows = austen_windows(
            tokenizer, args.context, args.continuation, args.windows, args.seed
        )
        return run_check(hf, windows, args)
    if args.write_cases:
        log(
            f"wrote the cases of {', '.join(args.tasks)} to {write_peer_cases(hf, tokenizer, args)}"
        )
        return 0

    out = Path(args.out)
    json_path = out.with_suffix(".json")
    results = load_results(json_path, {"cells": {}, "runs": []})
    results["runs"].append(
        {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else argv,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        }
    )
    for task in args.tasks:
        if task == "perplexity":
            run_perplexity(hf, tokenizer, args, results, json_path)
        else:
            run_cases(hf, tokenizer, task, args, results, json_path)
    save_results(json_path, results)

    # Every task with finished cells for these settings, run now or before.
    peer = load_peer(args)
    tables = build_tables(results, args, peer)
    text = markdown(args, tables, peer)
    print(text)
    out.with_suffix(".md").write_text(text)
    if tables and plot(tables, out.with_suffix(".png")):
        log(f"wrote {json_path}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
