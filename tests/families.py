"""Tiny, seeded, random decoders of every architecture family the project documents (docs/real_models.md),
with their distinctive parts switched on: Gemma 2/3 sliding-window layers (window shorter than the test
prompts), Gemma 3 q/k norms, pre/post feed-forward norms, soft-capping; nonzero norm weights everywhere (so a
replay that multiplied by ``weight`` where Gemma multiplies by ``1 + weight`` would fail)."""
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
                          GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 96
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
GEMMA_2_3 = dict(LLAMA_LIKE, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, LLAMA_LIKE),
    "llama": (LlamaConfig, LlamaForCausalLM, LLAMA_LIKE),
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(LLAMA_LIKE, head_dim=8)),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(GEMMA_2_3, attn_logit_softcapping=5.0,
                                                      final_logit_softcapping=3.0)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, GEMMA_2_3),
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                             bos_token_id=0, eos_token_id=0)),
    "neox": (GPTNeoXConfig, GPTNeoXForCausalLM, dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=3, num_attention_heads=4,
                                                     max_position_embeddings=64)),
}
REPLAYABLE = ("qwen2", "llama", "gemma", "gemma2", "gemma3")


def family_model(family: str, seed: int = 0, **overrides):
    """A tiny random model of ``family`` (float32, eval mode) with randomised norm weights."""
    config_class, model_class, settings = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**settings, **overrides})).eval()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def with_random_adapters(base, target, n_features: int = 24, seed: int = 0, meta: dict | None = None,
                         dtype=torch.float64):
    """``target`` spliced with ``base``'s MLPs and adapters whose decoders, encoder and decoder biases are random and
    nonzero (a fresh adapter writes nothing), every layer on "adapter", in ``dtype``."""
    from tdlib.adapter import AdapterSet
    from tdlib.splice import set_mlp_choice, splice

    adapters = AdapterSet.for_model(target, n_features=n_features, seed=seed, meta=meta or {})
    generator = torch.Generator().manual_seed(seed)
    for adapter in adapters.adapters.values():
        for parameter in (adapter.W_dec, adapter.b_enc, adapter.b_dec):
            torch.nn.init.normal_(parameter, std=0.3, generator=generator)
    model = splice(target, base, adapters).to(dtype)
    set_mlp_choice(model, "adapter")
    return model.eval()
