"""The ``kvslim-fx`` command line: numbers it prints match the library, errors are one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
from helpers import hf_model, kv_model
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE
from tiny_text import BOOKS, char_tokenizer, fast_tokenizer

import kvslim_fx
from kvslim_fx.cli import main
from kvslim_fx.errors import KVSlimError
from kvslim_fx.eval.answers import answer_case
from kvslim_fx.eval.haystack import needle_cases, retrieval_cases
from kvslim_fx.eval.perplexity import austen_windows, continuation_nll, perplexity
from kvslim_fx.methods import METHODS, parse_spec

UNK_TOKEN_ID = 3
# Word "w{i}" is token i, so a decoded text reads as its token ids.
PROMPT = " ".join(f"w{i}" for i in range(5, 29))  # 24 tokens: more than a 16-slot budget
PROMPT_IDS = torch.tensor([list(range(5, 29))])
STREAMING = ["--method", "streaming", "--budget", "16", "--sink", "2", "--chunk-size", "8"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny llama and a word-level tokenizer over its 128 ids, saved as a model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    hf_model("llama").save_pretrained(path)
    specials = {"<pad>": PAD_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID}
    vocab = {**specials, "<unk>": UNK_TOKEN_ID}
    vocab |= {f"w{i}": i for i in range(len(vocab), VOCAB_SIZE)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = fast_tokenizer(backend)
    assert tokenizer(PROMPT).input_ids == PROMPT_IDS[0].tolist()
    tokenizer.save_pretrained(path)
    return path


def stats(err: str) -> dict[str, float]:
    """The numbers of the stats block on stderr."""
    patterns = {
        "prompt": r"^prompt tokens: (\d+)$",
        "new": r"^new tokens: (\d+)$",
        "prefill_s": r"^prefill: ([\d.]+) s$",
        "decode_steps": r"^decode: (\d+) tokens in [\d.]+ s \(",
        "kept": r"^cache bytes: (\d+) kept / \d+ full",
        "full": r"^cache bytes: \d+ kept / (\d+) full",
        "percent": r"^cache bytes: .* \(([\d.]+)%\)$",
    }
    found = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, err, re.MULTILINE)
        assert match, f"no {key!r} line in stderr:\n{err}"
        found[key] = float(match.group(1))
    return found


def words(ids: torch.Tensor) -> str:
    return " ".join(f"w{i}" for i in ids.tolist() if i > UNK_TOKEN_ID)


@pytest.mark.parametrize("storage", ["dense", "int8"])
def test_generate_prints_the_library_tokens_and_cache_sizes(storage, model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "5"]
    assert main([*argv, *STREAMING, "--storage", storage]) == 0
    out, err = capsys.readouterr()

    model = kv_model("llama", "streaming", 16, chunk_size=8, sink=2, storage=storage)
    sequences = kvslim_fx.generate(model, PROMPT_IDS, max_new_tokens=5)
    new = sequences[0, PROMPT_IDS.shape[1] :]
    assert new.numel() == 5  # no EOS from this seed, so the numbers below are all non-trivial
    assert out == words(new) + "\n"

    got = stats(err)
    kept, full = model.cache_bytes(), model.full_cache_bytes(24 + 5)
    assert (got["prompt"], got["new"], got["decode_steps"]) == (24, 5, 4)
    assert got["prefill_s"] > 0
    assert (got["kept"], got["full"]) == (kept, full)
    assert kept < full  # 16 slots kept for 29 tokens
    assert got["percent"] == round(100 * kept / full, 1)


def test_sampling_and_fractional_budget_match_the_library(model_dir, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    argv = ["generate", "--model", str(model_dir), "--prompt-file", str(prompt_file)]
    argv += ["--method", "streaming", "--budget", "0.5", "--max-new-tokens", "6"]
    argv += ["--sample", "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    assert main(argv) == 0
    out, err = capsys.readouterr()

    model = kv_model("llama", "streaming", 0.5, chunk_size=512)
    sequences = kvslim_fx.generate(
        model,
        PROMPT_IDS,
        max_new_tokens=6,
        do_sample=True,
        temperature=0.8,
        top_k=20,
        generator=torch.Generator().manual_seed(3),
    )
    new = sequences[0, PROMPT_IDS.shape[1] :]
    assert out == words(new) + "\n"
    got = stats(err)
    assert (got["prompt"], got["new"]) == (24, new.numel())
    assert got["kept"] == model.cache_bytes()
    assert model.layers[0].capacity == 12  # the budget is half of the 24-token prompt


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # The known ones follow (other test modules register policies of their own).
        (["--method", "nope"], "unknown method 'nope'; choose one of: "),
        (["--budget", "abc"], "--budget must be a number of slots"),
        (["--method", "streaming", "--budget", "2", "--sink", "2"], "budget=2 must exceed sink=2"),
        (["--temperature", "0.5"], "need --sample"),
        (["--model", "MISSING"], "no model 'MISSING'"),
        (["--model", "EMPTY"], "EMPTY is a folder but has no config.json"),
        (["--option", "recent"], "option is KEY=VALUE"),
        (["--method", "kvslimmer", "--budget", "64", "--option", "bias_cap=0"], "bias_cap must"),
        (["--storage", "nope"], "unknown storage 'nope'; choose one of: "),
        (["--storage", "int8:group=3"], "group=3 must be at least 2 and divide"),
        (["--storage", "int8:bits=4"], "bad options for storage 'int8'"),
        (["--budget-schedule", "steep"], "budget_schedule must be one of uniform, pyramid"),
        (["--budget-schedule", "16,x"], "--budget-schedule takes uniform, pyramid or slots"),
    ],
    ids=[
        "method",
        "budget-abc",
        "budget-sink",
        "sampling-option",
        "missing-model",
        "empty-dir",
        "option-syntax",
        "option-value",
        "storage",
        "storage-value",
        "storage-option",
        "schedule",
        "schedule-list",
    ],
)
def test_bad_input_is_one_line_and_status_2(options, message, model_dir, tmp_path, capsys):
    paths = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path)}
    options = [paths.get(option, option) for option in options]
    message = message.replace("MISSING", paths["MISSING"]).replace("EMPTY", paths["EMPTY"])
    argv = ["generate", "--model", str(model_dir), "--prompt", "w5", *options]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvslim-fx: error: ")
    assert message in lines[0]


_WORDS = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
# Strings that would not read back as a bool or a number.
_VALUES = st.one_of(
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    _WORDS.filter(lambda t: t not in ("true", "false", "inf", "infinity", "nan")),
)


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


@settings(max_examples=50, deadline=None)
@given(
    name=st.sampled_from(sorted(METHODS)),
    options=st.dictionaries(_WORDS, _VALUES, max_size=4),
)
def test_method_spec_round_trips(name, options):
    """``name:key=value:...`` (a benchmark's method row) reads back as the name and options."""
    spec = ":".join([name] + [f"{key}={_text(value)}" for key, value in options.items()])
    assert parse_spec(spec) == (name, options)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("nope:recent=1", "unknown method 'nope'"), ("kvslimmer:recent", "option is KEY=VALUE")],
)
def test_bad_method_spec_names_the_problem(spec, message):
    with pytest.raises(KVSlimError, match=message):
        parse_spec(spec)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["generate", "export", "eval"]),
        (["generate"], ["--model PATH", "default: SmolLM2", "--prompt-file", "tokens/s"]),
        (["export"], ["--model PATH", "--out FILE", "--batch-size", "--max-length"]),
        (["eval"], ["--task {perplexity,needle,retrieval}", "--lengths", "--export-cases"]),
    ],
)
def test_help(command, expected, capsys):
    assert main([*command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert out.startswith(f"usage: kvslim-fx {' '.join(command)}".rstrip())
    for text in expected:
        assert text in out


def test_missing_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("kvslim-fx")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout and "export" in result.stdout


@pytest.mark.slow
def test_export_writes_a_loadable_package(model_dir, tmp_path, capsys):
    out_path = tmp_path / "tiny.pt2"
    argv = ["export", "--model", str(model_dir), *STREAMING, "--out", str(out_path)]
    assert main([*argv, "--max-length", "64"]) == 0
    assert capsys.readouterr().out == f"{out_path} ({out_path.stat().st_size} bytes)\n"
    runner = kvslim_fx.load(out_path)
    assert runner.meta["method"] == "streaming"
    assert runner.meta["options"] == {"budget": 16, "sink": 2}
    assert (runner.meta["chunk_size"], runner.meta["batch_size"]) == (8, 1)
    model = kv_model("llama", "streaming", 16, chunk_size=8, sink=2)
    model.reset(batch_size=1, max_length=64)
    assert runner.meta["cache_bytes"] == model.cache_bytes()


# --- eval: the tiny llama with a character-level tokenizer, on a small fake Austen corpus ---


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-chars")
    hf_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def fake_corpus(monkeypatch):
    monkeypatch.setattr("kvslim_fx.eval.perplexity.austen_text", lambda: dict(BOOKS))


GRID = ["--lengths", "320", "--depths", "0.2,0.8", "--seed", "3"]
EVAL_STREAMING = ["--method", "streaming", "--budget", "64", "--sink", "2", "--chunk-size", "64"]


@pytest.mark.parametrize("task", ["needle", "retrieval"])
def test_eval_answers_like_the_library_and_prints_the_grid(
    task, text_model_dir, fake_corpus, tmp_path, capsys
):
    out_json = tmp_path / "eval.json"
    # Four needles in the tiny model's 512 positions need a longer prompt than one.
    grid = ["--lengths", "480", "--depths", "0.5", "--seed", "3"] if task == "retrieval" else GRID
    argv = ["eval", "--model", str(text_model_dir), "--task", task, *grid]
    assert main([*argv, *EVAL_STREAMING, "--json", str(out_json)]) == 0
    out, _ = capsys.readouterr()

    build = needle_cases if task == "needle" else retrieval_cases
    cases = build(char_tokenizer(), [int(grid[1])], [float(d) for d in grid[3].split(",")], seed=3)
    model = kv_model("llama", "streaming", 64, chunk_size=64, sink=2)
    answers = [answer_case(model, char_tokenizer(), case) for case in cases]
    doc = json.loads(out_json.read_text())
    assert [c["output"] for c in doc["cases"]] == [a.output for a in answers]
    assert [c["id"] for c in doc["cases"]] == [c.id for c in cases]
    assert [c["cache_bytes"] for c in doc["cases"]] == [a.cache_bytes for a in answers]
    hits, n = sum(a.correct for a in answers), len(answers)
    assert doc["accuracy"] == hits / n
    assert doc["options"] == {"budget": 64, "sink": 2}
    assert f"| length \\ depth | {' | '.join(grid[3].split(','))} | all |" in out
    assert f"accuracy: {100 * hits / n:.1f}% ({hits}/{n})" in out


def test_eval_perplexity_matches_continuation_nll(text_model_dir, fake_corpus, tmp_path, capsys):
    out_json = tmp_path / "ppl.json"
    argv = ["eval", "--model", str(text_model_dir), "--task", "perplexity", "--windows", "2"]
    argv += ["--context", "60", "--continuation", "8", "--json", str(out_json)]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    windows = austen_windows(char_tokenizer(), 60, 8, 2)
    model = kv_model("llama", chunk_size=512)
    nlls = [continuation_nll(model, w, 60) for w in windows]
    doc = json.loads(out_json.read_text())
    got = [r["perplexity"] for r in doc["cases"]]
    assert got[:2] == pytest.approx([perplexity(nll) for nll in nlls], rel=1e-5)
    assert got[2] == pytest.approx(perplexity(torch.cat(nlls)), rel=1e-5)
    assert doc["perplexity"] == got[2]
    assert f"| all | {got[2]:.3f} |" in out


def test_eval_exports_the_cases_of_all_tasks(text_model_dir, fake_corpus, tmp_path, capsys):
    path = tmp_path / "cases.json"
    argv = ["eval", "--model", str(text_model_dir), "--lengths", "600", "--depths", "0.5"]
    argv += ["--windows", "1", "--context", "50", "--continuation", "10"]
    assert main([*argv, "--export-cases", str(path)]) == 0
    assert capsys.readouterr().out == (
        f"{path}: 1 perplexity windows, 1 needle and 1 retrieval cases\n"
    )
    doc = json.loads(path.read_text())
    (window,) = austen_windows(char_tokenizer(), 50, 10, 1)
    assert doc["model"] == str(text_model_dir)
    assert doc["perplexity"][0]["context"] == window[0, :50].tolist()
    assert doc["needle"][0]["prompt"] == needle_cases(char_tokenizer(), [600], [0.5])[0].prompt
    assert (
        doc["retrieval"][0]["answer"] == retrieval_cases(char_tokenizer(), [600], [0.5])[0].answer
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lengths", "abc"], "--lengths must be comma-separated numbers, e.g. 1024,4096"),
        (["--depths", "0.5,2"], "depths must be fractions in [0, 1]"),
        (["--lengths", "600"], "needs 608 positions, the model has 512; ask for shorter --lengths"),
        (["--task", "perplexity", "--context", "9000"], "ask for a shorter --context"),
        (["--samples", "0"], "--samples must be a positive integer"),
    ],
    ids=["lengths", "depths", "too-long", "no-window", "samples"],
)
def test_eval_bad_input_is_one_line(options, message, text_model_dir, fake_corpus, capsys):
    assert main(["eval", "--model", str(text_model_dir), *options]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("kvslim-fx: error: ") and message in err
