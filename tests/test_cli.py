"""The ``kvslim-fx`` command line: numbers it prints match the library, errors are one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
from helpers import hf_model, kv_model
from tiny_models import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE
from transformers import PreTrainedTokenizerFast

import kvslim_fx
from kvslim_fx.cli import main
from kvslim_fx.methods import METHODS

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
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
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


def test_generate_prints_the_library_tokens_and_cache_sizes(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", "5"]
    assert main([*argv, *STREAMING]) == 0
    out, err = capsys.readouterr()

    model = kv_model("llama", "streaming", 16, chunk_size=8, sink=2)
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
        (
            ["--method", "nope"],
            f"unknown method 'nope'; choose one of: {', '.join(sorted(METHODS))}",
        ),
        (["--budget", "abc"], "--budget must be a number of slots"),
        (["--method", "streaming", "--budget", "2", "--sink", "2"], "budget=2 must exceed sink=2"),
        (["--temperature", "0.5"], "need --sample"),
        (["--model", "MISSING"], "no model 'MISSING'"),
        (["--model", "EMPTY"], "EMPTY is a folder but has no config.json"),
    ],
    ids=["method", "budget-abc", "budget-sink", "sampling-option", "missing-model", "empty-dir"],
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


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["generate", "export"]),
        (["generate"], ["--model PATH", "default: SmolLM2", "--prompt-file", "tokens/s"]),
        (["export"], ["--model PATH", "--out FILE", "--batch-size", "--max-length"]),
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
