"""Where a merging method's largest slots lie, and how much the uncompressed model attends to
the tokens they hold.

For each Austen window (the quality benchmark's, same seed): the method reads the prompt
(bounded prefill, chunks of 512) and, per layer and KV head, its largest slot is located: slots
merge adjacent tokens and a merged slot keeps its later token's position, so in position order
slot ``i`` holds positions ``(pos[i-1], pos[i]]`` (checked against the cardinalities). Then
the original HF model runs the whole window once, and a hook on each attention module measures
how much of its attention (the softmax over every earlier token, mean over the KV head's query
heads and over the queries) the prompt's last query and the continuation's queries give those
positions. Token share against attention share says whether a big slot is a collapse (text the
model reads, blurred) or text the model does not read at that layer::

    python benchmarks/merged_slots.py --method kvslimmer --budget 0.25 --context 8064 \\
        --windows 1,2 --out benchmarks/results/merged-slots-8k

Writes ``OUT.json``, ``OUT.md`` (a row per layer and window) and ``OUT.png``. Llama-style
attention only (``q_proj``/``k_proj`` and the module's ``apply_rotary_pos_emb``): the default
model's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
from common import formatted, log, markdown_table, save_results
from torch import Tensor, nn

import kvslim_fx
from kvslim_fx.budget import parse_budget
from kvslim_fx.eval.default_model import load_default_model
from kvslim_fx.eval.perplexity import austen_windows
from kvslim_fx.methods import parse_spec


def largest_slots(model: kvslim_fx.KVSlimModel) -> list[list[tuple[int, int]]]:
    """Per layer and KV head of batch row 0, the first and last position of the slot holding
    the most tokens."""
    found = []
    for layer in model.layers:
        heads = []
        for pos, logc in zip(layer.pos[0], layer.log_cardinality()[0], strict=True):
            kept = pos >= 0
            order = pos[kept].argsort()
            pos, tokens = pos[kept][order], logc[kept][order].exp().round().long()
            before = torch.cat([pos.new_tensor([-1]), pos[:-1]])
            if not torch.equal(pos - before, tokens):
                raise RuntimeError("the slots' cardinalities do not tile the positions")
            i = int(tokens.argmax())
            heads.append((int(before[i]) + 1, int(pos[i])))
        found.append(heads)
    return found


Region = tuple[int | None, int, int]
"""A KV head (``None``: every head) and the first and last position (inclusive)."""


def query_heads(kv_head: int | None, group: int) -> slice:
    """The query heads reading ``kv_head`` (all of them for ``None``)."""
    return slice(None) if kv_head is None else slice(kv_head * group, (kv_head + 1) * group)


def attention_shares(
    hf_model: nn.Module, window: Tensor, first_query: int, regions: list[list[Region]]
) -> list[list[float]]:
    """Per layer, the attention the queries from ``first_query`` on give each of
    ``regions[layer]`` (the mean over the queries and the region's query heads), in HF's model
    run over ``window [1, T]``."""
    shares: list[list[float]] = []

    def measure(attn: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        B, T, _ = hidden.shape
        d = attn.head_dim
        q = attn.q_proj(hidden).view(B, T, -1, d).transpose(1, 2)
        k = attn.k_proj(hidden).view(B, T, -1, d).transpose(1, 2)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = rotate(q, k, cos, sin)
        group = q.shape[1] // k.shape[1]
        q = q[0, :, first_query:]  # [H_q, Q, d]
        logits = q @ k[0].repeat_interleave(group, 0).transpose(1, 2) * d**-0.5  # [H_q, Q, T]
        query_pos = torch.arange(first_query, T)[:, None]
        logits = logits.masked_fill(torch.arange(T) > query_pos, float("-inf"))
        probs = logits.softmax(-1)
        shares.append([
            float(probs[query_heads(h, group), :, lo : hi + 1].sum(-1).mean())
            for h, lo, hi in regions[len(shares)]
        ])  # fmt: skip

    hooks = [layer.self_attn.register_forward_pre_hook(measure, with_kwargs=True)
             for layer in hf_model.model.layers]  # fmt: skip
    try:
        with torch.no_grad():
            hf_model(window, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return shares


def middle(model: kvslim_fx.KVSlimModel, layer, length: int) -> tuple[int, int]:
    """The first and last position a ``length``-token prompt may merge in ``layer``: after the
    method's sinks, before its recent window (KVSlimmer's rules, not the slot layout's)."""
    C = layer.capacity
    return model.method.sink_for(C), length - 1 - model.method.recent_for(C)


def window_rows(
    args: argparse.Namespace, hf: nn.Module, model: kvslim_fx.KVSlimModel, window: Tensor, i: int
) -> list[dict]:
    """One row per layer of ``window``: its largest slot (the widest over KV heads) and the
    mergeable middle (after the sinks, before the recent window)."""
    model.reset(batch_size=1, max_length=window.shape[1], prompt_len=args.context)
    with torch.no_grad():
        for begin in range(0, args.context, model.chunk_size):
            model(window[:, begin : min(begin + model.chunk_size, args.context)])
        model.end_prompt()
    largest = [max(enumerate(heads), key=lambda h: h[1][1] - h[1][0])
               for heads in largest_slots(model)]  # fmt: skip
    regions = [[(h, lo, hi), (None, *middle(model, layer, args.context))]
               for (h, (lo, hi)), layer in zip(largest, model.layers, strict=True)]  # fmt: skip
    shares = attention_shares(hf, window, args.context - 1, regions)
    rows = []
    for layer, (((h, lo, hi), (_, m_lo, m_hi)), (share, middle_share)) in enumerate(
        zip(regions, shares, strict=True)
    ):
        tokens = hi - lo + 1
        rows.append({"window": i, "layer": layer, "head": h, "first": lo, "last": hi,
                     "tokens": tokens, "token_share": tokens / args.context,
                     "attention_share": share, "middle_tokens": m_hi - m_lo + 1,
                     "middle_share": middle_share})  # fmt: skip
    return rows


def render(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    frame = pd.DataFrame(rows).sort_values(["layer", "window"])
    table = pd.DataFrame({
        "layer": frame.layer.astype(str),
        "window": frame.window.astype(str),
        "positions": [f"{a}–{b}" for a, b in zip(frame["first"], frame["last"], strict=True)],
        "tokens": frame.tokens.astype(str),
        "% of prompt": formatted(100 * frame.token_share, "{:.2f}"),
        "% of attention": formatted(100 * frame.attention_share, "{:.4f}"),
        "per token, × the middle's": formatted(
            frame.attention_share / frame.tokens / (frame.middle_share / frame.middle_tokens),
            "{:.3f}"),
    })  # fmt: skip
    command = " ".join(["python", "benchmarks/merged_slots.py", *sys.argv[1:]])
    text = (
        f"# Largest merged slots and the attention they held\n\n{args.method} at budget "
        f"{args.budget} of a {args.context}-token Austen prompt (bounded prefill, chunks of 512),"
        f" SmolLM2-135M-Instruct in float32. Per layer, the slot holding the most tokens after "
        f"the prompt (over KV heads), and the share of the uncompressed model's attention that "
        f"its positions received from the prompt's last query and the {args.continuation} "
        f"continuation queries (mean over queries and the head's query group). 'per token, × the "
        f"middle's': that share per token over the attention per token of the whole mergeable "
        f"middle (after the sinks, before the recent window; every head).\n\n"
        f"{markdown_table(table, 'rrlrrrr')}\n\nCommand: "
        f"`{command}`\n"
    )
    out.with_suffix(".md").write_text(text)
    print(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for window, part in frame.groupby("window"):
        ax.scatter(part.layer, 100 * part.token_share, marker="o", label=f"% of prompt, w{window}")
        ax.scatter(part.layer, 100 * part.attention_share, marker="x",
                   label=f"% of attention, w{window}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("% (log scale)")
    ax.set_title(f"{args.method} {args.budget}: largest slot per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="kvslimmer", help="a method spec (kvslimmer:recent=32)")
    parser.add_argument("--budget", default="0.25", help="slots per layer or a fraction")
    parser.add_argument("--context", type=int, default=8064)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--windows", default="0", help="indices of the quality benchmark's windows")
    parser.add_argument("--count", type=int, default=4, help="windows drawn (as quality.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_model, tokenizer = load_default_model(torch.float32)
    hf_model.eval()
    windows = austen_windows(tokenizer, args.context, args.continuation, args.count, args.seed)
    budget = parse_budget(args.budget, "budget")
    name, options = parse_spec(args.method)
    model = kvslim_fx.transform(hf_model, name, budget, chunk_size=512, **options)
    rows = []
    for index in (int(w) for w in args.windows.split(",")):
        log(f"window {index}...")
        rows += window_rows(args, hf_model, model, windows[index], index)
        save_results(args.out.with_suffix(".json"), {"args": vars(args) | {"out": str(args.out)},
                                                     "rows": rows})  # fmt: skip
    render(rows, args, args.out)


if __name__ == "__main__":
    main()
