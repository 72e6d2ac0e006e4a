"""Answering retrieval cases through a compressed cache, and scoring the answers.

The cases come from :mod:`kvslim_fx.eval.haystack`; each is answered greedily with
:func:`kvslim_fx.generate` from an empty cache, so prefill and decode both compress::

    model = transform(hf, "streaming", 0.25)
    answers = [answer_case(model, tokenizer, case) for case in needle_cases(tokenizer)]
    accuracy(answers)            # overall, in [0, 1]
    accuracy_by_cell(answers)    # {(length, depth): accuracy}
    print(accuracy_grid(answers))  # markdown: a row per length, a column per depth
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..generate import _core, generate
from .haystack import Case

_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Answer:
    """What the model said to one case, and whether it was right.

    ``cache_bytes`` is the cache held after the answer (the method's capacity for the prompt);
    ``seconds`` the wall time of the whole ``generate`` call.
    """

    id: str
    task: str
    length: int
    depth: float
    answer: str
    output: str
    correct: bool
    cache_bytes: int
    seconds: float


def exact_match(output: str, answer: str) -> bool:
    """Whether the first number in ``output`` is exactly ``answer`` (a string of digits).

    The *first* number, not any: an answer that lists several numbers, or the right digits
    inside a longer number, is wrong.
    """
    first = _NUMBER.search(output)
    return first is not None and first.group() == answer


def answer_tokens(case: Case) -> int:
    """Tokens generated for ``case``: its answer's length plus 3.

    Room for a leading space and punctuation even when every digit is a token; more tokens
    cannot change the first number unless it is still being written.
    """
    return len(case.answer) + 3


@torch.no_grad()
def answer_case(model, tokenizer, case: Case, max_new_tokens: int | None = None) -> Answer:
    """Greedy answer of ``model`` (a transformed model or its compiled wrapper) to ``case``.

    ``max_new_tokens`` defaults to :func:`answer_tokens`.
    """
    core = _core(model)
    ids = torch.tensor([case.prompt], dtype=torch.long, device=core.device)
    n = answer_tokens(case) if max_new_tokens is None else max_new_tokens
    start = time.perf_counter()
    sequences = generate(model, ids, max_new_tokens=n)
    seconds = time.perf_counter() - start
    output = tokenizer.decode(sequences[0, len(case.prompt) :], skip_special_tokens=True)
    return Answer(
        case.id,
        case.task,
        case.length,
        case.depth,
        case.answer,
        output,
        exact_match(output, case.answer),
        core.cache_bytes(),
        seconds,
    )


def accuracy(answers: Iterable[Answer]) -> float:
    """The fraction of ``answers`` that are correct."""
    return statistics.fmean(a.correct for a in answers)


def accuracy_by_cell(answers: Iterable[Answer]) -> dict[tuple[int, float], float]:
    """Accuracy per ``(length, depth)`` cell, in the order the cells first appear."""
    cells: dict[tuple[int, float], list[bool]] = {}
    for a in answers:
        cells.setdefault((a.length, a.depth), []).append(a.correct)
    return {cell: statistics.fmean(hits) for cell, hits in cells.items()}


def accuracy_grid(answers: Sequence[Answer]) -> str:
    """A markdown table of accuracy (%): a row per length, a column per depth, plus the means.

    The "all" row and column pool every answer of that depth or length, so a cell asked
    several times (``samples``) weighs as much as its answers.
    """
    lengths = sorted({a.length for a in answers})
    depths = sorted({a.depth for a in answers})
    cells = accuracy_by_cell(answers)

    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.0f}%"

    lines = [
        "| length \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " | all |",
        "|---:|" + "---:|" * (len(depths) + 1),
    ]
    for n in lengths:
        row = [pct(cells.get((n, d))) for d in depths]
        row.append(pct(accuracy(a for a in answers if a.length == n)))
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    row = [pct(accuracy(a for a in answers if a.depth == d)) for d in depths]
    lines.append("| all | " + " | ".join([*row, pct(accuracy(answers))]) + " |")
    return "\n".join(lines)
