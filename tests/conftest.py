"""Tiny, seeded, randomly initialised models of several decoder families (built in memory, no hub)."""
import pytest
import torch
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 8}),
}


def tiny_model(family: str = "qwen2", seed: int = 0, **overrides):
    config_class, model_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return model_class(config_class(**{**TINY, **extra, **overrides})).eval()


@pytest.fixture
def tiny_pair():
    """(base, target): same architecture, different random weights."""
    return tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)


@pytest.fixture
def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
