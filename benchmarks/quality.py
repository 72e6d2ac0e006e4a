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

import torch
from common import load_results, log, save_results, token_digest

from kvslim_fx.budget import Budget, parse_budgets
from kvslim_fx.errors import KVSlimError
from kvslim_fx.eval.answers import answer_case, answer_tokens
from kvslim_fx.eval.case_file import write_cases
from kvslim_fx.eval.default_model import load_default_model
from kvslim_fx.eval.haystack import Case, needle_cases, retrieval_cases
from kvslim_fx.eval.perplexity import austen_windows, continuation_nll, perplexity, reference_nll
from kvslim_fx.methods import METHODS, make_method, parse_spec
from kvslim_fx.transform import transform

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASKS = ("perplexity", "needle", "retrieval")
CASE_BUILDERS = {"needle": needle_cases, "retrieval": retrieval_cases}
SHORT = {"perplexity": "ppl", "needle": "needle", "retrieval": "retrieval"}
TITLES = {
    "perplexity": "Continuation perplexity",
    "needle": "Needle in a haystack",
    "retrieval": "Retrieval (four keys, one asked)",
}
OUT = "benchmarks/results/quality"
PEER = "kvpress.json"  # the peer's results, beside OUT unless --peer says otherwise
PEER_TASKS = "kvpress_tasks.json"  # the cases written for it, beside OUT
PEER_PREFIX = "kvpress:"
# Used when the peer's metadata carries no note of its own (its COMPRESSION_NOTE).
PEER_CAVEATS = (
    "kvpress compresses once, at the end of prefill (its prefill attends over the whole "
    "uncompressed prompt, in one pass); the continuation or answer is then decoded through the "
    "compressed cache, which grows by one slot per token."
)


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
    for spec in args.methods:
        try:
            name, options = parse_spec(spec)
            make_method(name, **options)
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
    nll = continuation_nll(model, window, args.context, timings=timings)
    record = {
        "nll": [round(float(x), 6) for x in nll],
        "mean_nll": float(nll.double().mean()),
        "perplexity": perplexity(nll),
        "cache_bytes": model.cache_bytes(),
        "full_cache_bytes": model.full_cache_bytes(args.context + args.continuation),
        "capacity": model.layers[0].capacity,
        "prefill_s": timings["prefill_s"],
        "decode_s": timings["decode_s"],
        "seconds": timings["prefill_s"] + timings["decode_s"],
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
        model = timed_transform(hf, method, slots, args, label)
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


def summarize(results: dict, args: argparse.Namespace) -> list[dict]:
    """One perplexity row per (method, budget) over the requested windows, in a stable order."""
    groups: dict[tuple[str, int | None], list[dict]] = {}
    for cell in perplexity_cells(results, args):
        groups.setdefault((cell["method"], cell["budget_slots"]), []).append(cell)
    full = groups.get(("full", None), [])
    full_by_window = {c["window"]: c["perplexity"] for c in full}
    rows = []
    for (method, slots), cells in sorted(
        groups.items(), key=lambda kv: (method_order(kv[0][0]), kv[0][1] or 0)
    ):
        cells.sort(key=lambda c: c["window"])
        ppl = statistics.fmean(c["perplexity"] for c in cells)
        # Δ vs full over the same windows only, so a missing full window cannot skew it.
        paired = [c["perplexity"] - full_by_window[c["window"]] for c in cells
                  if c["window"] in full_by_window]  # fmt: skip
        rows.append(
            {
                "method": method,
                "budget": cell_budget(cells[0]),
                "budget_slots": slots,
                "budget_frac": cells[0]["budget_frac"],
                "windows": len(cells),
                "complete": len(cells) == args.windows,
                "cache_bytes": cells[0]["cache_bytes"],
                "full_cache_bytes": cells[0]["full_cache_bytes"],
                "quality": ppl,
                "per_window": [c["perplexity"] for c in cells],
                "delta_vs_full": statistics.fmean(paired) if paired else None,
                "seconds": statistics.fmean(c["seconds"] for c in cells),
                "prefill_s": statistics.fmean(c["prefill_s"] for c in cells),
                "decode_s": statistics.fmean(c["decode_s"] for c in cells),
                "merges": _merge_totals(cells),
                # Timings depend on the CPU threads the cell ran with (None: not recorded).
                "threads": sorted({c.get("threads") for c in cells}, key=str),
            }
        )
    return rows


def _merge_totals(cells: list[dict]) -> list[float] | None:
    stats = [c["merge_stats"] for c in cells if "merge_stats" in c]
    if not stats:
        return None
    return [
        statistics.fmean(sum(layer[i] for layer in s) for s in stats) for i in range(2)
    ]  # mean over windows of the sum over layers


def coverage(n: int, of: int) -> str:
    """``n`` windows or cases, saying so when it is fewer than the table's ``of``."""
    return f"{n}" if n == of else f"{n} of {of}"


def bytes_kept(row: dict) -> str:
    text = f"{row['cache_bytes'] / 2**20:.1f} MiB"
    # A kvpress prefill press compresses once: its cache then grows a slot per decoded token.
    end = row.get("cache_bytes_end")
    return text if end is None or end == row["cache_bytes"] else f"{text} → {end / 2**20:.1f}"


def perplexity_table(rows: list[dict], windows: int) -> str:
    lines = [
        "| method | budget (slots) | windows | cache bytes kept | % of full | perplexity "
        "| Δ vs full | per window | s / window (prefill + decode) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        slots = "all" if r["budget_slots"] is None else f"{r['budget_slots']}"
        if r["budget_frac"] is not None:
            slots += f" ({r['budget_frac']:g})"
        delta = "" if r["delta_vs_full"] is None else f"{r['delta_vs_full']:+.3f}"
        pct = 100 * r["cache_bytes"] / r["full_cache_bytes"]
        lines.append(
            f"| {r['method']} | {slots} | {coverage(r['windows'], windows)} "
            f"| {bytes_kept(r)} | {pct:.1f}% "
            f"| {r['quality']:.3f} | {delta} | "
            + ", ".join(f"{p:.3f}" for p in r["per_window"])
            + f" | {r['seconds']:.1f} ({r['prefill_s']:.1f} + {r['decode_s']:.1f}) |"
        )
    return "\n".join(lines)


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
        model = timed_transform(hf, method, budget, args, label)
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


def summarize_cases(results: dict, args: argparse.Namespace, task: str) -> list[dict]:
    """One row per (method, budget) over the requested grid's cases, in a stable order."""
    size = grid_size(args)
    groups: dict[tuple[str, str], list[dict]] = {}
    for cell in case_cells(results, args, task):
        groups.setdefault((cell["method"], cell["budget"]), []).append(cell)
    rows = []
    for (method, budget), cells in sorted(
        groups.items(), key=lambda kv: (method_order(kv[0][0]), budget_order(kv[0][1]))
    ):
        rows.append(
            {
                "method": method,
                "budget": budget,
                "cases": len(cells),
                "complete": len(cells) == size,
                "cache_bytes": statistics.fmean(c["cache_bytes"] for c in cells),
                "full_cache_bytes": statistics.fmean(c["full_cache_bytes"] for c in cells),
                "quality": statistics.fmean(c["correct"] for c in cells),
                "per_length": {
                    n: statistics.fmean(c["correct"] for c in cells if c["length"] == n)
                    for n in args.lengths
                    if any(c["length"] == n for c in cells)
                },
                "seconds": statistics.fmean(c["seconds"] for c in cells),
                "threads": sorted({c["threads"] for c in cells}, key=str),
            }
        )
    return rows


def accuracy_table(rows: list[dict], lengths: list[int], size: int) -> str:
    lines = [
        "| method | budget | cases | cache bytes kept (mean) | % of full | accuracy | "
        + " | ".join(f"{n} tokens" for n in lengths)
        + " | s / case |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(lengths) + "---:|",
    ]
    for r in rows:
        pct = 100 * r["cache_bytes"] / r["full_cache_bytes"]
        per_length = [
            f"{100 * r['per_length'][n]:.0f}%" if n in r["per_length"] else "" for n in lengths
        ]
        lines.append(
            f"| {r['method']} | {r['budget']} | {coverage(r['cases'], size)} | {bytes_kept(r)} "
            f"| {pct:.1f}% | {100 * r['quality']:.1f}% | "
            + " | ".join(per_length)
            + f" | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


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


def peer_groups(
    peer: dict, task: str, matches: set[tuple[str, str]], dtype: str
) -> list[tuple[str, float, list[dict]]]:
    """``(press, budget, rows)`` of ``task`` whose ``(id, token digest)`` is in ``matches``.

    The digest pins the very token ids, so a tasks file written with other settings (another
    seed or length, same ids) contributes nothing. Rows without one predate it and are left out.
    """
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in peer["rows"]:
        if (
            row["task"] == task
            and row.get("dtype") == dtype
            and (row["id"], row.get("tokens_sha1")) in matches
        ):
            groups.setdefault((row["press"], row["budget_fraction"]), []).append(row)
    # Presses in the order the peer ran them (its --presses), budgets ascending.
    order = {press: i for i, press in enumerate(dict.fromkeys(r["press"] for r in peer["rows"]))}
    return [
        (press, budget, rows)
        for (press, budget), rows in sorted(
            groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])
        )
    ]


def _peer_common(press: str, budget: float, rows: list[dict]) -> dict:
    """The fields a peer row shares between the two tables: name, bytes, seconds, threads."""
    return {
        "method": PEER_PREFIX + press,
        "budget": f"{budget:g}",
        "cache_bytes": statistics.fmean(r["cache_bytes"] for r in rows),
        "cache_bytes_end": statistics.fmean(r["cache_bytes_end"] for r in rows),
        "full_cache_bytes": statistics.fmean(r["full_cache_bytes"] for r in rows),
        "seconds": statistics.fmean(r["prefill_s"] + r["decode_s"] for r in rows),
        "threads": sorted({r["threads"] for r in rows}, key=str),
    }


def peer_perplexity_rows(peer: dict, cells: list[dict], args: argparse.Namespace) -> list[dict]:
    """Perplexity rows of the peer over the windows of ``cells`` (this table's)."""
    window = {f"window-{c['window']}": c["window"] for c in cells}
    matches = {(f"window-{c['window']}", c["window_sha1"]) for c in cells}
    full = {c["window"]: c["perplexity"] for c in cells if c["method"] == "full"}
    out = []
    for press, budget, rows in peer_groups(peer, "perplexity", matches, args.dtype):
        rows.sort(key=lambda r: window[r["id"]])
        ppl = [math.exp(statistics.fmean(r["nll"])) for r in rows]
        paired = [p - full[window[r["id"]]] for p, r in zip(ppl, rows, strict=True)
                  if window[r["id"]] in full]  # fmt: skip
        out.append(
            _peer_common(press, budget, rows)
            | {
                "budget_slots": rows[0]["cache_slots"],
                "budget_frac": budget,
                "windows": len(rows),
                "complete": len(rows) == args.windows,
                "quality": statistics.fmean(ppl),
                "per_window": ppl,
                "delta_vs_full": statistics.fmean(paired) if paired else None,
                "prefill_s": statistics.fmean(r["prefill_s"] for r in rows),
                "decode_s": statistics.fmean(r["decode_s"] for r in rows),
                "merges": None,
            }
        )
    return out


def peer_case_rows(
    peer: dict, cells: list[dict], args: argparse.Namespace, task: str
) -> list[dict]:
    """Needle or retrieval rows of the peer over the cases of ``cells`` (this table's)."""
    matches = {(c["id"], c["prompt_sha1"]) for c in cells}
    out = []
    for press, budget, rows in peer_groups(peer, task, matches, args.dtype):
        out.append(
            _peer_common(press, budget, rows)
            | {
                "cases": len(rows),
                "complete": len(rows) == grid_size(args),
                "quality": statistics.fmean(r["correct"] for r in rows),
                "per_length": {
                    n: statistics.fmean(r["correct"] for r in rows if r["length"] == n)
                    for n in args.lengths
                    if any(r["length"] == n for r in rows)
                },
            }
        )
    return out


def peer_commands(args: argparse.Namespace, tables: dict[str, list[dict]], peer: dict) -> str:
    """The two steps that recompute the peer's rows of ``tables``, then the merging rerun."""
    rows = [r for task_rows in tables.values() for r in task_rows if is_peer(r["method"])]
    meta = peer["meta"]
    tasks = meta.get("tasks") or str(Path(args.out).with_name(PEER_TASKS))
    presses = dict.fromkeys(r["method"].removeprefix(PEER_PREFIX) for r in rows)
    # `none` runs at budget 1, whatever --budgets says; the others take fractions below 1.
    budgets = sorted({r["budget"] for r in rows} - {"1"}, key=float)
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


def build_tables(
    results: dict, args: argparse.Namespace, peer: dict | None
) -> dict[str, list[dict]]:
    """Every task with finished cells for these settings, the peer's matching rows after them."""
    ppl_cells = perplexity_cells(results, args)
    tables = {"perplexity": summarize(results, args)}
    if peer and tables["perplexity"]:
        tables["perplexity"] += peer_perplexity_rows(peer, ppl_cells, args)
    for task in CASE_BUILDERS:
        tables[task] = summarize_cases(results, args, task)
        if peer and tables[task]:
            tables[task] += peer_case_rows(peer, case_cells(results, args, task), args, task)
    return {task: rows for task, rows in tables.items() if rows}


# --- shared ---


def cells_to_run(args: argparse.Namespace) -> list[tuple[str, Budget]]:
    """(method, budget) pairs in order; full runs once, without a budget."""
    return [
        (method, budget)
        for method in args.methods
        for budget in ([None] if method == "full" else args.budgets)
    ]


def timed_transform(hf, method: str, budget: Budget, args: argparse.Namespace, label: str):
    start = time.perf_counter()
    name, options = parse_spec(method)
    model = transform(hf, name, budget, chunk_size=args.chunk_size, **options)
    log(f"{label}: transformed in {time.perf_counter() - start:.1f} s")
    return model


def _threads_note(rows: list[dict]) -> str:
    counts = {t for r in rows for t in r["threads"]}
    if len(counts) == 1:
        return f"{counts.pop()} CPU thread(s)"
    per_row = "; ".join(
        f"{r['method']} {r['budget']}: {'/'.join(map(str, r['threads']))}" for r in rows
    )
    return f"CPU threads per cell (not the same for all rows, compare timings with care): {per_row}"


def command(args: argparse.Namespace, tables: dict[str, list[dict]], python: str = "python") -> str:
    """The command line that computes every kvslim row of ``tables`` (rerunning none that is
    done) and merges the peer's."""
    rows = [r for task_rows in tables.values() for r in task_rows if not is_peer(r["method"])]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = sorted({r["budget"] for r in rows} - {"all"}, key=budget_order)
    argv = [python, "benchmarks/quality.py", "--tasks", ",".join(tables)]
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
    argv += ["--out", args.out] if args.out != OUT else []
    argv += ["--peer", args.peer] if args.peer else []
    return shlex.join(argv)


def markdown(args: argparse.Namespace, tables: dict[str, list[dict]], peer: dict | None) -> str:
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
    if peer and any(is_peer(r["method"]) for rows in tables.values() for r in rows):
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
            merge_rows = [r for r in rows if r["merges"]]
            if merge_rows:
                md += [
                    "Merges (merged runs counted per KV head, summed over layers, mean over "
                    "windows):",
                    "",
                ]
                md += [
                    f"- {r['method']} {r['budget_slots']}: {r['merges'][0]:.0f} merges, "
                    f"{r['merges'][1]:.0f} fallbacks to the score-weighted mean"
                    for r in merge_rows
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


def summary(tables: dict[str, list[dict]]) -> str:
    """Every method's quality per task and budget, one row per method (what the README shows).

    Perplexity is the mean over the windows, needle and retrieval the accuracy; an uncompressed
    row (``full``, the peer's ``none``) fills the "uncompressed" column. Only complete rows.
    """
    budgets = sorted({r["budget"] for rows in tables.values() for r in rows
                      if not _uncompressed(r)}, key=budget_order)  # fmt: skip
    columns = [(task, b) for task in tables for b in ["all", *budgets]]
    values: dict[str, dict[tuple[str, str], str]] = {}
    for task, rows in tables.items():
        for r in rows:
            if not r["complete"]:
                continue
            q = f"{r['quality']:.2f}" if task == "perplexity" else f"{100 * r['quality']:.0f}%"
            budget = "all" if _uncompressed(r) else r["budget"]
            values.setdefault(r["method"], {})[(task, budget)] = q
    columns = [c for c in columns if any(c in v for v in values.values())]
    head = [f"{SHORT[task]} {'uncompressed' if b == 'all' else b}" for task, b in columns]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    for method, v in values.items():
        lines.append(f"| {method} | " + " | ".join(v.get(c, "") for c in columns) + " |")
    return "\n".join(lines)


def _uncompressed(row: dict) -> bool:
    return row["method"] in ("full", PEER_PREFIX + "none")


def plot(tables: dict[str, list[dict]], path: Path) -> bool:
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
        rows = [r for r in rows if r["complete"]]
        scale = 1 if task == "perplexity" else 100
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["cache_bytes"] / 2**20, scale * r["quality"]) for r in rows
                         if r["method"] == method)  # fmt: skip
            if method == "full":
                ax.axhline(pts[0][1], color="gray", ls="--", lw=1)
                ax.plot(*zip(*pts, strict=True), "k*", ms=10, label="full")
            elif is_peer(method):
                ax.plot(*zip(*pts, strict=True), "s:", mfc="none", label=method)
            else:
                ax.plot(*zip(*pts, strict=True), "o-", label=method)
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
