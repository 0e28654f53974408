"""Tiny causal LMs and tokenizers built in-process (no hub, no network), shared by the trainer
integration tests (TRL, verl, OpenRLHF).

``tiny_tokenizer()``: a ``tokenizers`` WordLevel tokenizer over whitespace-split words
``w0 .. w{n-1}`` plus special tokens, wrapped in ``PreTrainedTokenizerFast`` with a minimal chat
template. ``tiny_qwen2(tokenizer)``: a 2-layer Qwen2 whose vocabulary is the tokenizer's.
``prompts(n)`` / ``words(...)``: short strings made of tokenizer words, for tiny datasets.
"""

from __future__ import annotations

import random

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
# A chat template a trainer can apply to conversational data (role tag, content, end token).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def tiny_tokenizer(n_words: int = 250):
    """A fast tokenizer with ``len(SPECIAL) + n_words`` tokens: pad, unk, bos, eos and chat tags."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [f"w{i}" for i in range(n_words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_qwen2(tokenizer=None, *, hidden_size: int = 48, layers: int = 2, seed: int = 0,
               tie_word_embeddings: bool = False):
    """A randomly initialised ``Qwen2ForCausalLM`` (float32) sized for CPU tests."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def words(rng: random.Random, n: int, n_words: int = 250) -> str:
    """``n`` random tokenizer words joined by spaces."""
    return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n))


def prompts(n: int, *, seed: int = 0, length: tuple[int, int] = (3, 6)) -> list[str]:
    """``n`` prompts of ``length[0]..length[1]`` words."""
    rng = random.Random(seed)
    return [words(rng, rng.randint(*length)) for _ in range(n)]
