"""Bad input gets a KVSlimError naming the problem and the fix, never a deep stack trace."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_model, kv_model, prompts, transform_reusing_trace
from tiny_models import tiny_config, tiny_model
from transformers import AutoModelForCausalLM, Gemma2Config

import kvslim_fx
from kvslim_fx import KVSlimError
from kvslim_fx.export import Runner


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(KVSlimError, match=r"unknown method 'kvzip'.*full.*streaming"):
        kvslim_fx.transform(hf_model("llama"), "kvzip", 64)


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("2048", "budget must be a number"),
        (True, "budget must be a number"),
        (4, "must exceed sink=4"),
        (2, "must exceed sink=4"),
        (0.0, r"fractional budget must lie in \(0, 1\]"),
        (1.5, r"fractional budget must lie in \(0, 1\]"),
    ],
)
def test_bad_budgets(budget, message):
    with pytest.raises(KVSlimError, match=message):
        kvslim_fx.transform(hf_model("llama"), "streaming", budget, sink=4)


def test_bad_options():
    with pytest.raises(KVSlimError, match="sink must be a non-negative integer"):
        kvslim_fx.transform(hf_model("llama"), "streaming", 64, sink=-1)
    with pytest.raises(KVSlimError, match="bad options for method 'streaming'"):
        kvslim_fx.transform(hf_model("llama"), "streaming", 64, window=3)
    with pytest.raises(KVSlimError, match="chunk_size must be a positive integer"):
        kvslim_fx.transform(hf_model("llama"), chunk_size=0)
    with pytest.raises(KVSlimError, match="expected a Hugging Face causal LM"):
        kvslim_fx.transform(torch.nn.Linear(2, 2))


def test_eager_attention_is_retraced_with_sdpa_and_restored():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
    model.eval()
    rewritten = kvslim_fx.transform(model)
    assert model.config._attn_implementation == "eager"
    ids, _ = prompts(1, 20)
    with torch.no_grad():
        assert (rewritten(ids) - model(ids).logits).abs().max() < 1e-5


def test_soft_capped_attention_is_refused_with_the_reason():
    config = Gemma2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(KVSlimError, match="gemma2: attention logits are soft-capped"):
        kvslim_fx.transform(model)
    # Without the cap the same model still needs SDPA, which transformers' Gemma2 refuses.
    config.attn_logit_softcapping = None
    model = AutoModelForCausalLM.from_config(config).eval()
    if getattr(model, "_supports_sdpa", False):
        return  # transformers releases that let Gemma2 run SDPA: nothing left to refuse
    with pytest.raises(
        KVSlimError, match="gemma2: attention is 'eager' and the model refuses SDPA"
    ):
        kvslim_fx.transform(model)


def test_prompt_longer_than_the_model_positions():
    model = kv_model("llama")
    ids, mask = prompts(1, 600)
    with pytest.raises(KVSlimError, match="512 positions"):
        model.reset(batch_size=1)
        model(ids, mask)
    with pytest.raises(KVSlimError, match="exceeds the model's 512 positions"):
        kvslim_fx.generate(model, ids[:, :500], max_new_tokens=20)


def test_full_cache_overflow_names_the_fix():
    model = kv_model("llama")
    model.reset(batch_size=1, max_length=64)
    ids, _ = prompts(1, 65)
    with pytest.raises(KVSlimError, match=r"holds 64 tokens.*reset\(max_length"):
        model(ids)


def test_input_ids_dtype_device_and_mask_shape():
    model = kv_model("llama")
    ids, mask = prompts(1, 8)
    with pytest.raises(KVSlimError, match="int64 token ids"):
        model(ids.float())
    with pytest.raises(KVSlimError, match="are on meta but the model is on cpu"):
        model(ids.to("meta"))
    with pytest.raises(KVSlimError, match=r"attention_mask has shape \(8,\) but input_ids"):
        model(ids, mask[0])
    with pytest.raises(KVSlimError, match="input_ids must be a"):
        kvslim_fx.generate(model, ids[0])
    with pytest.raises(KVSlimError, match="max_new_tokens must be"):
        kvslim_fx.generate(model, ids, max_new_tokens=-1)


def test_batch_change_mid_sequence_is_refused():
    model = kv_model("llama")
    model.reset(batch_size=1, max_length=64)
    model(prompts(1, 4)[0])
    with pytest.raises(KVSlimError, match="batch size changed from 1 to 2"):
        model(prompts(2, 4)[0])


def test_unsupported_graph_names_the_architecture_and_node():
    from kvslim_fx.passes.sdpa import GraphRewriteError, replace_sdpa

    class NoAttention(torch.nn.Module):
        def forward(self, x):
            return x + 1

    gm = torch.export.export(NoAttention(), (torch.ones(2),)).module()
    with pytest.raises(GraphRewriteError, match="llama: the exported graph has no"):
        replace_sdpa(gm, tiny_config("llama"), lambda site: torch.nn.Identity())


# --- Inputs that used to end in a raw error from deep inside torch -----------------------------


def runner(batch: int = 2) -> Runner:
    """A package runner whose compiled programs must never run: its checks refuse the input
    first."""

    def step(*args):
        raise AssertionError("the compiled step ran on bad input")

    meta = {"chunk_size": 4, "batch_size": batch, "device": "cpu", "eos_token_id": None,
            "pad_token_id": None, "state": [], "vocab_size": 128, "capacity": None,
            "max_positions": 512}  # fmt: skip
    return Runner({"step": step, "decode": step}, meta)


def refused(ids, mask, message: str, generate_message: str | None = None) -> None:
    """``ids``/``mask`` get a KVSlimError matching ``message`` from the model, ``generate`` (on
    the model and on a package runner) and the runner itself."""
    model = kv_model("llama")
    model.reset(batch_size=2, max_length=64)
    for call in (
        lambda: model(ids, mask),
        lambda: runner()(ids, mask),
    ):
        with pytest.raises(KVSlimError, match=message):
            call()
    for target in (model, runner()):
        with pytest.raises(KVSlimError, match=generate_message or message):
            kvslim_fx.generate(target, ids, mask, max_new_tokens=2)


def test_input_ids_of_three_dimensions():
    ids, _ = prompts(2, 8)
    refused(ids[None], None, r"input_ids must be a \[batch, length\] tensor .* shape \(1, 2, 8\)")


def test_token_id_beyond_the_vocabulary():
    ids, mask = prompts(2, 8)
    ids[1, 5] = 128
    refused(ids, mask, r"token id 128 is outside the model's vocabulary \(ids 0\.\.127\)")


def test_negative_token_id():
    ids, mask = prompts(2, 8, [0, 3])
    ids[mask == 0] = -1  # padding filled with -1 instead of a pad token
    refused(ids, mask, r"token id -1 is outside the model's vocabulary.*pad token")


def test_attention_mask_of_another_length():
    ids, mask = prompts(2, 8)
    refused(
        ids, mask[:, 1:],
        r"attention_mask has shape \(2, 7\) but input_ids \(2, 8\): pass the mask of the whole "
        r"sequence \[batch, past \+ length\] or of the new tokens \[batch, length\]",
        r"attention_mask has shape \(2, 7\) but input_ids \(2, 8\): generate takes the "
        r"prompt's mask",
    )  # fmt: skip
    # A longer mask is the whole sequence's for a call; for generate it is a wrong mask.
    with pytest.raises(KVSlimError, match=r"shape \(2, 9\) but input_ids \(2, 8\)"):
        kvslim_fx.generate(kv_model("llama"), ids, torch.ones(2, 9, dtype=torch.long))


def test_empty_prompt():
    ids, mask = prompts(2, 8)
    refused(ids[:, :0], mask[:, :0], r"the prompt is empty .*\(2, 0\).*pass at least one token")
    refused(ids[:0], mask[:0], r"input_ids has no rows .*\(0, 8\).*pass at least one prompt")


def test_the_vocabulary_is_the_input_embeddings_rows():
    # Some models pad their embedding past config.vocab_size: every row is a valid id.
    hf = tiny_model("llama")
    hf.config.vocab_size = 100
    model = transform_reusing_trace(hf)
    assert model.vocab_size == 128
    ids = torch.tensor([[3, 120, 127]])
    assert model(ids).shape == (1, 3, 128)
    with pytest.raises(KVSlimError, match=r"ids 0\.\.127"):
        model(torch.tensor([[3, 128]]))
