"""Needle and retrieval prompts (exact length, needle at its depth, seeded), exact-match scoring,
the JSON case export, and a smoke run of the harness on a tiny random model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import hf_model, kv_model
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_text import BOOKS, char_tokenizer

from kvslim_fx import KVSlimError
from kvslim_fx.eval import haystack
from kvslim_fx.eval.answers import (
    Answer,
    accuracy,
    accuracy_by_cell,
    answer_case,
    exact_match,
)
from kvslim_fx.eval.case_file import write_cases
from kvslim_fx.eval.haystack import NAMES, needle_cases, retrieval_cases

TOKENIZER = char_tokenizer()
CHAT_TOKENIZER = char_tokenizer(chat=True)


@pytest.fixture(autouse=True)
def fake_corpus(monkeypatch):
    monkeypatch.setattr("kvslim_fx.eval.perplexity.austen_text", lambda: dict(BOOKS))


def ids(text: str) -> list[int]:
    return TOKENIZER(text, add_special_tokens=False)["input_ids"]


def sentence_starts(text: str) -> set[int]:
    """Reference: offsets of the whitespace after a sentence's final punctuation."""
    ends = re.finditer(r"[.!?][\"']*(?=\s)", text)
    return {0, len(text)} | {m.end() for m in ends if not text[: m.start()].endswith(" Mr")}


def split_needles(case, needles: list[str], tokenizer=TOKENIZER) -> tuple[str, list[int]]:
    """The prompt's text with ``needles`` taken out, and where each one started (in the rest)."""
    text = tokenizer.decode(case.prompt)
    spots = []
    for needle in needles:
        at = text.index(needle)
        spots.append(at)
        text = text[:at] + text[at + len(needle) :]
    return text, spots


@settings(max_examples=25, deadline=None)
@given(
    length=st.integers(300, 1500),
    depth=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_needle_prompt_has_the_length_and_the_needle_at_the_nearest_sentence_start(
    length, depth, seed
):
    (case,) = needle_cases(TOKENIZER, [length], [depth], seed=seed, chat=False)
    assert len(case.prompt) == case.length == length
    assert case.depth == depth and re.fullmatch(r"[1-9]\d{4}", case.answer)
    needle = haystack.NEEDLE.format(code=case.answer)
    # The answer is recoverable where the case says the needle starts.
    assert case.prompt[case.position : case.position + len(ids(needle))] == ids(needle)
    rest, (at,) = split_needles(case, [needle])
    head = haystack.NEEDLE_INSTRUCTION + "\n\n"
    tail = f"\n\n{haystack.NEEDLE_QUESTION} {haystack.NEEDLE_ANSWER}"
    assert rest.startswith(head) and rest.endswith(tail) and at == case.position
    hay = rest[len(head) : -len(tail)]
    assert any(hay in book for book in BOOKS.values())  # one run of consecutive text
    cut, target = at - len(head), round(depth * len(hay))
    starts = sentence_starts(hay)
    assert cut in starts
    assert all(abs(k - target) >= abs(cut - target) for k in starts)


def test_cases_are_deterministic_in_the_seed_and_share_a_haystack_across_depths():
    depths = [0.0, 0.25, 0.5, 1.0]
    cases = needle_cases(TOKENIZER, [400, 600], depths, samples=2, seed=5, chat=False)
    assert cases == needle_cases(TOKENIZER, [400, 600], depths, samples=2, seed=5, chat=False)
    assert [c.id for c in cases[:5]] == [
        "needle-400-0-0",
        "needle-400-0.25-0",
        "needle-400-0.5-0",
        "needle-400-1-0",
        "needle-400-0-1",
    ]
    assert len({c.answer for c in cases}) > len(cases) // 2
    other = needle_cases(TOKENIZER, [400, 600], depths, samples=2, seed=6, chat=False)
    assert [c.answer for c in other] != [c.answer for c in cases]
    for group in (cases[0:4], cases[4:8], cases[8:12]):
        stacks = {split_needles(c, [haystack.NEEDLE.format(code=c.answer)])[0] for c in group}
        assert len(stacks) == 1  # only the needle moved
    positions = [c.position for c in cases[4:8]]  # 600 tokens: room for several sentences
    assert positions == sorted(positions) and positions[0] < positions[-1]


def test_retrieval_case_hides_distinct_keys_and_asks_the_one_at_its_depth():
    cases = retrieval_cases(TOKENIZER, [900], [0.2, 0.8], keys=5, seed=2, chat=False)
    for case in cases:
        text = TOKENIZER.decode(case.prompt)
        assert len(case.prompt) == 900 and re.fullmatch(r"[1-9]\d{3}", case.answer)
        found = re.findall(r"The secret number of ([A-Z][a-z]+ [A-Z][a-z]+) is (\d+)\.\n", text)
        names, codes = zip(*found, strict=True)
        assert len(found) == 5 and set(names) <= set(NAMES)
        assert len(set(names)) == 5 and len(set(codes)) == 5
        asked = re.search(r"What is the secret number of (.+)\? Answer", text).group(1)
        assert dict(found)[asked] == case.answer
        needle = haystack.RETRIEVAL_NEEDLE.format(name=asked, code=case.answer)
        assert TOKENIZER.decode(case.prompt[case.position :]).startswith(needle)
        assert text.endswith(haystack.RETRIEVAL_ANSWER.format(name=asked))
    assert cases[0].position < cases[1].position  # depth 0.2 before depth 0.8


def test_chat_framing_wraps_the_text_in_the_template_at_the_same_length():
    (case,) = needle_cases(CHAT_TOKENIZER, [700], [0.5], chat=None)  # None: the template is there
    text = CHAT_TOKENIZER.decode(case.prompt)
    assert len(case.prompt) == 700
    assert text.startswith(f"<s>user\n{haystack.NEEDLE_INSTRUCTION}\n\n")
    assert text.endswith(
        f"\n\n{haystack.NEEDLE_QUESTION}</s>\n<s>assistant\n{haystack.NEEDLE_ANSWER}"
    )
    assert case.prompt[0] == 1  # "<s>" is the special token, not three characters
    assert haystack.NEEDLE.format(code=case.answer) in text


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: needle_cases(TOKENIZER, [200]), "no room for haystack text"),
        (lambda: needle_cases(TOKENIZER, [9000]), "no Austen novel has 9000 tokens"),
        (lambda: needle_cases(TOKENIZER, [400], [1.5]), "depths must be fractions"),
        (lambda: needle_cases(TOKENIZER, [0]), "lengths must be positive"),
        (lambda: retrieval_cases(TOKENIZER, [400], keys=0), "keys must lie in"),
        (lambda: retrieval_cases(TOKENIZER, [400], keys=12, digits=1), "distinct 1-digit"),
    ],
)
def test_bad_grids_are_refused(call, message):
    with pytest.raises(KVSlimError, match=message):
        call()


@pytest.mark.parametrize(
    ("output", "correct"),
    [
        (" 40817.", True),
        ("40817", True),
        (" is 40817, I think", True),
        (" 408170.", False),  # a longer number
        (" 4081", False),  # cut short
        (" 12345 or 40817", False),  # only the first number counts
        (" the pass key", False),
        ("", False),
    ],
)
def test_exact_match_is_the_first_number(output, correct):
    assert exact_match(output, "40817") is correct


@given(answer=st.from_regex(r"[1-9]\d{0,6}", fullmatch=True), text=st.text("abc .,\n"))
def test_exact_match_finds_the_answer_after_any_text_without_digits(answer, text):
    assert exact_match(f"{text} {answer}{text}", answer)
    assert not exact_match(f"{text} {answer}7{text}", answer)


def test_accuracy_overall_and_per_cell():
    def answer(length, depth, correct):
        return Answer("x", "needle", length, depth, "1", "1", correct, 0, 0.0)

    answers = [answer(100, 0.5, True), answer(100, 0.5, False), answer(200, 0.1, True)]
    answers.append(answer(100, 0.1, False))
    assert accuracy(answers) == 0.5
    assert accuracy_by_cell(answers) == {(100, 0.5): 0.5, (200, 0.1): 1.0, (100, 0.1): 0.0}
    assert list(accuracy_by_cell(answers)) == [(100, 0.5), (200, 0.1), (100, 0.1)]


def test_full_answers_like_hf_greedy_generate_and_compressed_methods_run():
    cases = needle_cases(TOKENIZER, [320, 480], [0.5], chat=False)
    hf = hf_model("llama")
    for case in cases:
        got = answer_case(kv_model("llama"), TOKENIZER, case)
        prompt = torch.tensor([case.prompt])
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                          max_new_tokens=len(case.answer) + 3)  # fmt: skip
        expected = TOKENIZER.decode(ref[0, len(case.prompt) :], skip_special_tokens=True)
        assert (got.id, got.length, got.depth, got.answer) == (
            case.id, case.length, case.depth, case.answer)  # fmt: skip
        assert got.output == expected
        assert got.correct == exact_match(expected, case.answer)
        kv_model("llama").reset(batch_size=1, max_length=case.length + 8)  # 5 digits + 3
        assert got.cache_bytes == kv_model("llama").cache_bytes()
        assert got.seconds > 0
    small = answer_case(kv_model("llama", "streaming", 64), TOKENIZER, cases[1])
    assert small.cache_bytes < got.cache_bytes / 4


def test_written_cases_follow_the_schema(tmp_path):
    windows = [torch.arange(10).unsqueeze(0), torch.arange(20, 30).unsqueeze(0)]
    needle = needle_cases(TOKENIZER, [320], [0.5], chat=False)
    retrieval = retrieval_cases(TOKENIZER, [600, 700], [0.1, 0.9], chat=False)
    path = write_cases(tmp_path / "cases.json", "tiny", windows, 6, needle, retrieval)
    doc = json.loads(path.read_text())
    assert list(doc) == ["model", "perplexity", "needle", "retrieval"]
    assert doc["model"] == "tiny"
    assert doc["perplexity"] == [
        {"id": "window-0", "context": [0, 1, 2, 3, 4, 5], "continuation": [6, 7, 8, 9]},
        {"id": "window-1", "context": list(range(20, 26)), "continuation": [26, 27, 28, 29]},
    ]
    for key, cases in (("needle", needle), ("retrieval", retrieval)):
        assert [set(d) for d in doc[key]] == [{"id", "length", "depth", "prompt", "answer"}] * len(
            cases
        )
        for d, case in zip(doc[key], cases, strict=True):
            assert (d["id"], d["length"], d["depth"], d["answer"]) == (
                case.id, case.length, case.depth, case.answer)  # fmt: skip
            assert d["prompt"] == case.prompt and len(d["prompt"]) == d["length"]
    with pytest.raises(KVSlimError, match="too few for a 10-token context"):
        write_cases(tmp_path / "bad.json", "tiny", windows, 10, [], [])
