"""Long-context retrieval prompts: facts hidden at chosen depths in Jane Austen's prose.

Two tasks, one builder. **needle**: the paragraph "The pass key is 40817. Remember it. 40817 is
the pass key." hidden at depth ``d`` of the text, then "What is the pass key? Answer with the
number." and the answer opened with "The pass key is". **retrieval**: ``keys`` paragraphs "The
secret number of Anne Elliot is 5203." hidden at different depths; the one at depth ``d`` is
asked for. Each prompt is an instruction, a run of consecutive tokens of one novel (the
haystack) with the needles spliced in, and the question, inside the tokenizer's chat template
when it has one (a user turn, then the assistant's turn opened with the answer's first words)::

    cases = needle_cases(tokenizer, lengths=[1024, 4096], depths=[0.1, 0.5, 0.9])
    cases[0].prompt      # exactly 1024 token ids
    cases[0].answer      # "40817": right if it is the first number generated

Prompts are token ids, built to an exact length: the instruction, needles and question are
tokenized on their own and the haystack fills the rest. Depth ``d`` puts the needle at the
haystack's sentence start nearest to token ``round(d * H)`` (``H`` haystack tokens), so that it
reads as a paragraph of its own. The same ``seed`` (and corpus and tokenizer) always gives the
same cases; the haystack of a ``(length, sample)`` is shared by all depths, so a depth sweep
moves only the needle.

The wording and the chat framing are what SmolLM2-135M-Instruct needs to answer with the
``full`` cache: a needle spliced into a sentence, or a plain-text prompt without the chat
template, made it continue the novel instead in about one case in ten.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import KVSlimError
from .perplexity import austen_tokens

DEFAULT_LENGTHS = (1024, 2048, 4096, 7168)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)

NEEDLE_INSTRUCTION = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key."
)
NEEDLE = "\n\nThe pass key is {code}. Remember it. {code} is the pass key.\n\n"
NEEDLE_QUESTION = "What is the pass key? Answer with the number."
NEEDLE_ANSWER = "The pass key is"

RETRIEVAL_INSTRUCTION = (
    "The secret numbers of some people are hidden inside a lot of irrelevant text. Find them "
    "and memorize them. I will quiz you about one of them."
)
RETRIEVAL_NEEDLE = "\n\nThe secret number of {name} is {code}.\n\n"
RETRIEVAL_QUESTION = "What is the secret number of {name}? Answer with the number."
RETRIEVAL_ANSWER = "The secret number of {name} is"

# Austen's own characters: a name in a needle may also occur in the haystack, but never with a
# number, so the question has one answer.
NAMES = (
    "Elizabeth Bennet",
    "Fitzwilliam Darcy",
    "Jane Bennet",
    "Charles Bingley",
    "Emma Woodhouse",
    "George Knightley",
    "Harriet Smith",
    "Frank Churchill",
    "Anne Elliot",
    "Frederick Wentworth",
    "Elinor Dashwood",
    "Marianne Dashwood",
    "Edward Ferrars",
    "John Willoughby",
    "Fanny Price",
    "Edmund Bertram",
    "Mary Crawford",
    "Henry Crawford",
    "Catherine Morland",
    "Henry Tilney",
    "Isabella Thorpe",
    "John Thorpe",
)

# "Mr." and "Mrs." end no sentence; Austen's text has few other abbreviations.
_SENTENCE_END = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)[.!?][\"'_)\]]*\Z")


@dataclass(frozen=True)
class Case:
    """One prompt and the number a correct answer to it generates first.

    ``prompt`` holds exactly ``length`` token ids; the asked needle starts at
    ``prompt[position]``; ``depth`` is the requested depth; ``sample`` numbers the cases of
    one ``(length, depth)`` cell.
    """

    id: str
    task: str
    length: int
    depth: float
    sample: int
    prompt: list[int]
    answer: str
    position: int


@dataclass(frozen=True)
class Quiz:
    """What one case hides and asks, as text: ``needles`` are ``(depth, sentence)`` pairs."""

    instruction: str
    needles: list[tuple[float, str]]
    question: str
    answer_prefix: str
    answer: str


def needle_cases(
    tokenizer,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 1,
    seed: int = 0,
    digits: int = 5,
    chat: bool | None = None,
) -> list[Case]:
    """Pass-key cases: every ``(length, depth)`` cell ``samples`` times, ``digits``-digit codes.

    ``chat``: wrap the text in the tokenizer's chat template (a user turn, then the assistant's
    turn opened with "The pass key is"); ``None`` does so when the tokenizer has a template.
    """
    _check_grid(lengths, depths, samples, digits)

    def quiz(rng: random.Random, depth: float) -> Quiz:
        code = _code(rng, digits)
        needle = NEEDLE.format(code=code)
        return Quiz(NEEDLE_INSTRUCTION, [(depth, needle)], NEEDLE_QUESTION, NEEDLE_ANSWER, code)

    return _cases(tokenizer, "needle", quiz, lengths, depths, samples, seed, chat)


def retrieval_cases(
    tokenizer,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 1,
    seed: int = 0,
    digits: int = 4,
    keys: int = 4,
    chat: bool | None = None,
) -> list[Case]:
    """Several-needle cases: ``keys`` people's secret numbers, the one at ``depth`` asked for.

    The other ``keys - 1`` needles go to seeded uniform depths; names and numbers are distinct
    within a case. ``chat`` as in :func:`needle_cases`.
    """
    _check_grid(lengths, depths, samples, digits)
    if not 1 <= keys <= len(NAMES):
        raise KVSlimError(f"keys must lie in [1, {len(NAMES)}] (one name each), got {keys}")
    if keys > 9 * 10 ** (digits - 1):
        raise KVSlimError(f"{keys} distinct {digits}-digit numbers do not exist; use more digits")

    def quiz(rng: random.Random, depth: float) -> Quiz:
        names = rng.sample(NAMES, keys)
        codes: list[str] = []
        while len(codes) < keys:
            code = _code(rng, digits)
            codes += [] if code in codes else [code]
        spots = [depth] + [rng.random() for _ in range(keys - 1)]
        needles = [
            (spot, RETRIEVAL_NEEDLE.format(name=name, code=code))
            for spot, name, code in zip(spots, names, codes, strict=True)
        ]
        question = RETRIEVAL_QUESTION.format(name=names[0])
        answer_prefix = RETRIEVAL_ANSWER.format(name=names[0])
        return Quiz(RETRIEVAL_INSTRUCTION, needles, question, answer_prefix, codes[0])

    return _cases(tokenizer, "retrieval", quiz, lengths, depths, samples, seed, chat)


def _cases(
    tokenizer,
    task: str,
    quiz: Callable[[random.Random, float], Quiz],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    seed: int,
    chat: bool | None,
) -> list[Case]:
    """One case per ``(length, sample, depth)``; ``quiz`` draws what to hide from a seeded rng."""
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    books = _books(tokenizer, max(lengths))
    cases = []
    for length in lengths:
        for sample in range(samples):
            hay = _haystack(books, random.Random(f"{task}/{seed}/{length}/{sample}"), length)
            for depth in depths:
                q = quiz(random.Random(f"{task}/{seed}/{length}/{depth}/{sample}"), depth)
                head, tail = _frame(tokenizer, q, chat)
                needles = [(d, _tokens(tokenizer, text)) for d, text in q.needles]
                prompt, positions = splice(tokenizer, head, hay, needles, tail, length)
                cases.append(
                    Case(f"{task}-{length}-{depth:g}-{sample}", task, length, depth, sample,
                         prompt, q.answer, positions[0])
                )  # fmt: skip
    return cases


def _frame(tokenizer, quiz: Quiz, chat: bool) -> tuple[list[int], list[int]]:
    """The token ids before and after the haystack.

    Plain: the instruction, a blank line, the haystack, a blank line, the question and the
    answer prefix. Chat: the same text up to the question as the user's message, then the
    assistant's turn opened with the answer prefix; the template is rendered around a
    placeholder and split there, so any chat template works.
    """
    if not chat:
        return (
            _tokens(tokenizer, quiz.instruction + "\n\n"),
            _tokens(tokenizer, f"\n\n{quiz.question} {quiz.answer_prefix}"),
        )
    mark = "\x00HAYSTACK\x00"
    message = f"{quiz.instruction}\n\n{mark}\n\n{quiz.question}"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(mark)
    return _tokens(tokenizer, before), _tokens(tokenizer, after + quiz.answer_prefix)


def splice(
    tokenizer,
    head: list[int],
    haystack: Sequence[int],
    needles: Sequence[tuple[float, list[int]]],
    question: list[int],
    length: int,
) -> tuple[list[int], list[int]]:
    """``head + haystack (needles spliced in at their depths) + question``, ``length`` ids long.

    Uses the first ``H`` tokens of ``haystack``, ``H`` being what the head, question and
    needles leave of ``length``; needle ``i`` goes before the haystack's sentence start nearest
    to token ``round(depth_i * H)``, and needles that land on the same start keep their order.
    Returns the prompt and each needle's start index in it.
    """
    room = length - len(head) - len(question) - sum(len(ids) for _, ids in needles)
    if room < 1:
        raise KVSlimError(
            f"a {length}-token prompt has no room for haystack text around its "
            f"{length - room} instruction, needle and question tokens; ask for a longer length"
        )
    if len(haystack) < room:
        raise KVSlimError(f"the haystack has {len(haystack)} tokens, the prompt needs {room}")
    hay = list(haystack[:room])
    starts = _sentence_starts(tokenizer, hay)
    cuts = [_nearest(starts, round(depth * room)) for depth, _ in needles]
    positions = [0] * len(needles)
    prompt, done = list(head), 0
    for i in sorted(range(len(needles)), key=lambda i: (cuts[i], i)):
        prompt += hay[done : cuts[i]]
        done = cuts[i]
        positions[i] = len(prompt)
        prompt += needles[i][1]
    prompt += hay[done:] + question
    return prompt, positions


def _sentence_starts(tokenizer, hay: list[int]) -> list[int]:
    """The cuts ``k`` (a needle goes before ``hay[k]``) that start a sentence, sorted.

    A sentence starts after ``.``, ``!`` or ``?`` (closing quotes allowed) where whitespace
    follows; the haystack's two ends always count. Token ``k``'s text is read as
    ``decode([k-1, k])`` minus ``decode([k-1])``, since tokenizers that mark a word's leading
    space on the token (SentencePiece's ``▁``) drop that space when a token is decoded alone.
    """
    alone = tokenizer.batch_decode([[i] for i in hay], clean_up_tokenization_spaces=False)
    pairs = tokenizer.batch_decode(
        [hay[k - 1 : k + 1] for k in range(1, len(hay))], clean_up_tokenization_spaces=False
    )
    pieces = alone[:1] + [pair[len(alone[k]) :] for k, pair in enumerate(pairs)]
    starts = [0, len(hay)]
    for k in range(1, len(hay)):
        # A few pieces back: a closing quote or bracket may be a token of its own.
        before = "".join(pieces[max(0, k - 3) : k])
        # The needle goes between the punctuation and the whitespace that follows it.
        if pieces[k][:1].isspace() and _SENTENCE_END.search(before):
            starts.append(k)
    return sorted(starts)


def _nearest(starts: list[int], target: int) -> int:
    """The start nearest ``target``; the earlier one on a tie."""
    return min(starts, key=lambda k: (abs(k - target), k))


def _books(tokenizer, length: int) -> list[list[int]]:
    books = [ids for ids in austen_tokens(tokenizer).values() if len(ids) >= length]
    if not books:
        raise KVSlimError(f"no Austen novel has {length} tokens for a haystack; ask for less")
    return books


def _haystack(books: list[list[int]], rng: random.Random, length: int) -> list[int]:
    """``length`` consecutive tokens of a seeded book at a seeded offset."""
    ids = books[rng.randrange(len(books))]
    start = rng.randrange(len(ids) - length + 1)
    return ids[start : start + length]


def _code(rng: random.Random, digits: int) -> str:
    # No leading zero: the answer reads the same as a number and as a string.
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_grid(lengths: Sequence[int], depths: Sequence[float], samples: int, digits: int) -> None:
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise KVSlimError(f"lengths must be positive token counts, e.g. 1024,4096; got {lengths}")
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise KVSlimError(f"depths must be fractions in [0, 1], e.g. 0.1,0.5,0.9; got {depths}")
    if samples < 1 or digits < 1:
        raise KVSlimError(f"samples and digits must be positive, got {samples} and {digits}")
