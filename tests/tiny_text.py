"""Tiny text for tests: a character-level tokenizer and Austen-like prose to feed it.

The tokenizer gives one id per character, every id below the tiny models' vocabulary of 128,
so English prose, digits and needles all tokenize losslessly. Ids: ``<pad>`` 0, ``<s>`` 1,
``</s>`` 2, ``<unk>`` 3, newline 4, printable ASCII (space to ``~``) 5..99. It is a real
``PreTrainedTokenizerFast``: it saves, loads, decodes and (with ``chat=True``) renders a
ChatML-like chat template, like a Hugging Face model's tokenizer.
"""

from __future__ import annotations

import random

import tokenizers
from tiny_models import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID
from transformers import PreTrainedTokenizerFast

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
FIRST_CHAR_ID = 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def fast_tokenizer(backend: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
    """``backend`` as a transformers tokenizer with the tiny models' special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def char_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    specials = {"<pad>": PAD_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID, "<unk>": 3}
    vocab = specials | {c: FIRST_CHAR_ID + i for i, c in enumerate(CHARS)}
    # BPE without merges over single characters: every character is its own token.
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = tokenizers.decoders.Fuse()
    tokenizer = fast_tokenizer(backend)
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


WORDS = ("she", "had", "been", "very", "much", "pleased", "with", "the", "letter", "and", "her",
         "sister", "was", "not", "at", "home")  # fmt: skip


def prose(seed: int, sentences: int) -> str:
    """Sentences of 3-30 words with quotes, paragraphs, and a "Mr." that ends no sentence."""
    rng = random.Random(seed)
    out = []
    for i in range(sentences):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        sentence = sentence.capitalize() + rng.choice([".", "!", "?", '."', "; Mr. Elton."])
        out.append(sentence + ("\n\n" if i % 5 == 4 else " "))
    return "".join(out)


# Two books long enough for prompts of up to ~2500 tokens, and one too short for any.
BOOKS = {"Emma": prose(0, 60), "Persuasion": prose(1, 50), "Short": "Too short."}
