"""Continuation perplexity of each method on Jane Austen, with the default model.

For every (method, budget, window) cell: prefill ``--context`` tokens of a novel, teacher-force
the next ``--continuation`` tokens one at a time (decode-time compression active), and record
the per-token NLL, the cache bytes kept and the time taken. ``full`` is the reference (it
reproduces the original model; ``--check`` verifies that against one HF forward pass)::

    python benchmarks/quality.py --context 8064 --continuation 128 --windows 2 \\
        --methods full,streaming,kvslimmer --budgets 0.25

Why 8064 + 128: SmolLM2-135M has 8192 positions and the window must fit them, so the longest
context that leaves a 128-token continuation is 8192 - 128 = 8064.

Budgets are fractions of the context turned into a whole number of slots per layer
(``round(frac * context)``, e.g. 0.25 → 2016), so every method is compared at the same cache
size; ``full`` ignores them. Writes ``OUT.json`` (every per-window number, settings, versions),
``OUT.md`` (the table) and ``OUT.png`` (perplexity against cache bytes). Finished cells are kept
in ``OUT.json`` and skipped on a rerun with the same settings, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kvslim_fx.evaluate import austen_windows, continuation_nll, perplexity, reference_nll
from kvslim_fx.methods import METHODS
from kvslim_fx.models import load_default_model
from kvslim_fx.transform import transform

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=8064, help="prefilled tokens per window")
    p.add_argument("--continuation", type=int, default=128, help="teacher-forced tokens scored")
    p.add_argument("--windows", type=int, default=2, help="Austen windows per cell")
    p.add_argument("--methods", default="full,streaming,kvslimmer")
    p.add_argument("--budgets", default="0.25", help="fractions of the context, comma-separated")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0, help="window selection seed")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk (tokens)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is much faster on cores shared with "
        "other jobs, where every small op of a decode step waits for a descheduled thread",
    )
    p.add_argument("--out", default="benchmarks/results/quality", help="output path stem")
    p.add_argument(
        "--check",
        action="store_true",
        help="only check that full's NLL equals one HF forward pass on each window, then exit",
    )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {sorted(METHODS)}")
    args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    if any(not 0 < b <= 1 for b in args.budgets):
        p.error("--budgets are fractions of the context in (0, 1]")
    return args


def cell_key(method: str, slots: int | None, args: argparse.Namespace, window: int) -> str:
    # dtype and seed too: a cell computed in bf16 or on other windows is not the same cell.
    return (
        f"{method}|budget={slots if slots is not None else 'all'}|context={args.context}"
        f"|continuation={args.continuation}|window={window}|dtype={args.dtype}|seed={args.seed}"
    )


def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"cells": {}, "runs": []}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a kill mid-write never loses the finished cells


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


def run_cell(model, window: torch.Tensor, args: argparse.Namespace) -> dict:
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


def summarize(results: dict, args: argparse.Namespace) -> list[dict]:
    """One row per (method, budget) over the requested windows, in a stable order."""
    groups: dict[tuple[str, int | None], list[dict]] = {}
    for cell in results["cells"].values():
        s = cell["settings"]
        if (s["context"], s["continuation"], s["dtype"], s["seed"]) != (
            args.context,
            args.continuation,
            args.dtype,
            args.seed,
        ) or cell["window"] >= args.windows:
            continue
        groups.setdefault((cell["method"], cell["budget_slots"]), []).append(cell)
    full = groups.get(("full", None), [])
    full_by_window = {c["window"]: c["perplexity"] for c in full}
    order = {m: i for i, m in enumerate(METHODS)}
    rows = []
    for (method, slots), cells in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1] or 0)
    ):
        cells.sort(key=lambda c: c["window"])
        ppl = statistics.fmean(c["perplexity"] for c in cells)
        # Δ vs full over the same windows only, so a missing full window cannot skew it.
        paired = [c["perplexity"] - full_by_window[c["window"]] for c in cells
                  if c["window"] in full_by_window]  # fmt: skip
        rows.append(
            {
                "method": method,
                "budget_slots": slots,
                "budget_frac": cells[0]["budget_frac"],
                "windows": len(cells),
                "cache_bytes": cells[0]["cache_bytes"],
                "full_cache_bytes": cells[0]["full_cache_bytes"],
                "perplexity": ppl,
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


def _threads_note(rows: list[dict]) -> str:
    counts = {t for r in rows for t in r["threads"]}
    if len(counts) == 1:
        return f"{counts.pop()} CPU thread(s)"
    per_row = "; ".join(
        f"{r['method']} {r['budget_slots'] or 'all'}: {'/'.join(map(str, r['threads']))}"
        for r in rows
    )
    return (
        f"CPU threads per window (not the same for all rows, compare timings with care): {per_row}"
    )


def table(rows: list[dict]) -> str:
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
            f"| {r['method']} | {slots} | {r['windows']} "
            f"| {r['cache_bytes'] / 2**20:.1f} MiB | {pct:.1f}% "
            f"| {r['perplexity']:.3f} | {delta} | "
            + ", ".join(f"{p:.3f}" for p in r["per_window"])
            + f" | {r['seconds']:.1f} ({r['prefill_s']:.1f} + {r['decode_s']:.1f}) |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, args: argparse.Namespace) -> bool:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    # A mean over fewer windows is not comparable with the others: partial rows stay off the plot.
    rows = [r for r in rows if r["windows"] == args.windows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["cache_bytes"] / 2**20, r["perplexity"]) for r in rows
                     if r["method"] == method)  # fmt: skip
        if method == "full":
            ax.axhline(pts[0][1], color="gray", ls="--", lw=1)
            ax.plot(*zip(*pts, strict=True), "k*", ms=10, label="full")
        else:
            ax.plot(*zip(*pts, strict=True), "o-", label=method)
    ax.set_xscale("log")
    # Plain MiB numbers on the log axis, not 6x10^0-style ticks.
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("KV cache bytes kept (MiB, log scale)")
    ax.set_ylabel(f"continuation perplexity ({args.continuation} tokens)")
    ax.set_title(
        f"SmolLM2-135M, Austen, context {args.context}, {args.windows} window(s), {args.dtype}"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
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
    if args.context + args.continuation > max_pos:
        sys.exit(
            f"context + continuation = {args.context + args.continuation} exceeds the model's "
            f"{max_pos} positions; e.g. --context {max_pos - args.continuation}"
        )
    windows = austen_windows(tokenizer, args.context, args.continuation, args.windows, args.seed)
    if args.check:
        return run_check(hf, windows, args)

    out = Path(args.out)
    json_path = out.with_suffix(".json")
    results = load_results(json_path)
    results["runs"].append(
        {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else argv,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        }
    )
    digests = [hashlib.sha1(w.numpy().tobytes()).hexdigest()[:16] for w in windows]

    for method in args.methods:
        fracs: list[float | None] = [None] if method == "full" else list(args.budgets)
        for frac in fracs:
            slots = None if frac is None else round(frac * args.context)
            keys = [cell_key(method, slots, args, i) for i in range(args.windows)]
            todo = [
                i
                for i, key in enumerate(keys)
                if results["cells"].get(key, {}).get("window_sha1") != digests[i]
            ]
            label = f"{method} budget={slots if slots is not None else 'all'}"
            if not todo:
                log(f"{label}: all {args.windows} windows done, skipped")
                continue
            start = time.perf_counter()
            model = transform(hf, method, slots, chunk_size=args.chunk_size)
            log(f"{label}: transformed in {time.perf_counter() - start:.1f} s")
            for i in todo:
                log(f"{label}: window {i + 1}/{args.windows}...")
                record = run_cell(model, windows[i], args)
                record |= {
                    "method": method,
                    "budget_frac": frac,
                    "budget_slots": slots,
                    "window": i,
                    "window_sha1": digests[i],
                    "window_text": tokenizer.decode(windows[i][0, args.context - 24 :])[:200],
                    "settings": {
                        "context": args.context,
                        "continuation": args.continuation,
                        "dtype": args.dtype,
                        "seed": args.seed,
                        "chunk_size": args.chunk_size,
                        "options": model.method.options(),
                    },
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                }
                results["cells"][keys[i]] = record
                save_results(json_path, results)
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

    save_results(json_path, results)
    rows = summarize(results, args)
    text = table(rows)
    print(text)
    md = [
        "# Continuation perplexity",
        "",
        f"SmolLM2-135M-Instruct ({args.dtype}), Jane Austen: {args.windows} window(s) of "
        f"{args.context} context + {args.continuation} teacher-forced tokens (seed {args.seed}), "
        "decoded one token at a time. Budget = KV slots per layer (a fraction of the context). "
        "Cache bytes: K, V and per-slot metadata at capacity, against an uncompressed "
        f"cache of {args.context + args.continuation} tokens. Perplexity: mean over windows; "
        f"Δ vs full over the same windows. Seconds: wall time, torch {torch.__version__}, "
        f"{_threads_note(rows)}.",
        "",
        text,
        "",
    ]
    merge_rows = [r for r in rows if r["merges"]]
    if merge_rows:
        md += [
            "Merges (merged runs counted per KV head, summed over layers, mean over windows):",
            "",
        ]
        md += [
            f"- {r['method']} {r['budget_slots']}: {r['merges'][0]:.0f} merges, "
            f"{r['merges'][1]:.0f} fallbacks to the score-weighted mean"
            for r in merge_rows
        ]
        md.append("")
    out.with_suffix(".md").write_text("\n".join(md))
    if plot(rows, out.with_suffix(".png"), args):
        log(f"wrote {json_path}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
