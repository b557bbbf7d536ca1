"""Tiny random-weight models for a live vLLM engine, made at test time (no hub, no download).

A full-attention ``LlamaForCausalLM`` and a hybrid ``Gemma2ForCausalLM`` (sliding-window and
full-attention layers alternate), each with a byte-level BPE tokenizer trained here. Weights are
random: the engine's KV cache does not care what the model says, only how many tokens it holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

HIDDEN = 128
LAYERS = 2
HEADS = 4
VOCAB = 512
SLIDING_WINDOW = 128
MAX_POSITIONS = 4096

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a key value cache holds the attention state of every token",
    "prefix caching reuses blocks that earlier requests already computed",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
] * 50


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)


def make_model(directory: Path, kind: str) -> Path:
    """Write a tiny model of ``kind`` ("llama" or "gemma2") to ``directory``; returns it."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        torch_dtype="float32",
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "gemma2":
        config = Gemma2Config(
            **common,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=HIDDEN // HEADS,
        )
        model = Gemma2ForCausalLM(config)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    _tokenizer(directory)
    return directory


if __name__ == "__main__":
    make_model(Path(sys.argv[1]), sys.argv[2])
