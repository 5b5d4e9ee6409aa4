"""Tiny, seeded, randomly initialised models of several decoder families (built in memory, no hub)."""
import sys
from pathlib import Path

import pytest
import torch
from transformers import (GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # the measurement scripts' helpers

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


@pytest.fixture(scope="session", autouse=True)
def smoke_runs():
    """The smoke pair and its default sweep (2 adapters, the MLP fine-tune, the local-MSE baseline), trained
    once per session (seconds; finished runs are loaded): many tests load these models by name."""
    from tdlib.models import load_tokenizer
    from tdlib.pair_data import data_for
    from tdlib.pairs import resolve_pair
    from tdlib.sweep import default_plan, run_sweep

    pair = resolve_pair("smoke")
    plan = default_plan(pair)
    data = data_for(pair, load_tokenizer(pair.target), batch_size=plan.base.batch_size, seed=plan.base.seed)
    run_sweep(pair, plan, data, progress=False)
    return pair
