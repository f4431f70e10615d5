"""Tiny local language models for tests: a word-level tokenizer trained on a corpus and a random Llama.

No hub access: the tokenizer is trained with ``tokenizers`` on the test's own texts, the model is built
from a ``LlamaConfig`` with seeded random weights.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
CHAT_TOKENS = ["<|user|>", "<|assistant|>"]


def word_tokenizer(
    corpus: list[str],
    chat_template: str | None = CHAT_TEMPLATE,
    *,
    vocab_size: int | None = None,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``corpus`` (+ "Yes. No."), adding BOS, with an optional chat template."""
    specials = ["<unk>", "<pad>", "<s>", "</s>", *CHAT_TOKENS]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer_kwargs = {"special_tokens": specials} | ({"vocab_size": vocab_size} if vocab_size else {})
    tok.train_from_iterator([*corpus, "Yes. No."], trainers.WordLevelTrainer(**trainer_kwargs))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=CHAT_TOKENS,
        padding_side=padding_side,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    vocab_size: int | None = None,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 512,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A seeded random Llama sized for tests (eval mode, float32): the vocabulary and special ids of
    ``tokenizer``, or ``vocab_size`` ids when a test feeds token ids directly."""
    if (tokenizer is None) == (vocab_size is None):
        raise ValueError("give exactly one of tokenizer and vocab_size")
    torch.manual_seed(seed)
    special = (
        {}
        if tokenizer is None
        else {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer) if tokenizer is not None else vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        use_cache=False,
        **special,
    )
    return LlamaForCausalLM(config).float().eval()
