"""Small model configurations shared by the tests (no hub access: models are built from configs)."""

from typing import Any


def tiny_marian_config(**overrides: Any):
    """A 1+1-layer Marian with d_model 16 (``overrides`` set vocabulary, special tokens, depth, dropout)."""
    from transformers import MarianConfig

    settings = {
        "d_model": 16,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "max_position_embeddings": 32,
    }
    return MarianConfig(**(settings | overrides))


def tiny_bert_config(**overrides: Any):
    """A 1-layer BERT with hidden size 16 (``overrides`` set vocabulary, labels, ...)."""
    from transformers import BertConfig

    settings = {
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
    }
    return BertConfig(**(settings | overrides))
