"""The memory plan's dry run on the meta device: parameter counts, byte arithmetic, measured activations."""
import sys
from pathlib import Path

import pytest
import torch

from tdlib.adapter import AdapterSet
from tdlib.memory import (MemoryPlanConfig, ModelShape, build_meta_spliced,
                          count_parameters, measure_saved_activations, parameter_bytes_check, plan_memory,
                          render_markdown)
from tdlib.splice import splice

SMALL = ModelShape("small", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, source="test")


def test_meta_model_has_no_storage_and_the_real_parameter_count():
    model = build_meta_spliced(SMALL, n_features=16)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(model)
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(0)
    real_target, real_base = Qwen2ForCausalLM(SMALL.qwen2_config()), Qwen2ForCausalLM(SMALL.qwen2_config())
    real = splice(real_target, real_base, AdapterSet.for_model(real_target, 16))
    assert counts.target + counts.base_mlps + counts.adapters == sum(p.numel() for p in real.parameters())
    assert counts.base_mlps == 3 * 3 * 32 * 64
    assert counts.adapters == 3 * (2 * 16 * 32 + 16 + 32)


def test_plan_bytes_follow_the_parameter_count():
    plan = plan_memory(MemoryPlanConfig(shape=SMALL, n_features=16, seq_tokens=50, runtime_overhead_gb=0.0))
    counts = plan.parameters
    assert parameter_bytes_check(plan) < 1e-9
    assert plan.static_gb["AdamW states (2 per adapter parameter)"] == pytest.approx(
        2 * 4 * counts["adapters"] / 1e9)
    assert plan.static_gb["frozen target weights"] == pytest.approx(2 * counts["target"] / 1e9)
    no_ckpt, ckpt, chunked = [s.activations_gb for s in plan.strategies]
    assert chunked <= ckpt and all(s.total_gb == pytest.approx(plan.static_total_gb + s.activations_gb)
                                   for s in plan.strategies)


def test_activations_grow_linearly_with_tokens_and_count_every_layer_call():
    model = build_meta_spliced(SMALL, n_features=16)
    short, long = measure_saved_activations(model, 50), measure_saved_activations(model, 100)
    assert len(short.layer_calls) == 3 + 2 * (3 - 1)  # adapter pass + two bridges from cut 1
    assert sum(long.layer_calls) == 2 * sum(short.layer_calls)
    assert long.logits_and_kl == 2 * short.logits_and_kl > 0
    # a layer whose input carries grad keeps at least its MLP's gate, up and product (bf16); the first layer
    # of the adapter pass (input from the frozen embeddings) keeps only what the adapter needs
    assert max(short.layer_calls) >= 3 * 50 * 64 * 2
    assert short.layer_calls[0] < 3 * 50 * 64 * 2 <= short.layer_calls[1]


def test_7b_numbers_match_the_published_parameter_count():
    plan = plan_memory(MemoryPlanConfig(seq_tokens=1000))
    assert 7.6e9 < plan.parameters["target"] < 7.62e9  # DeepSeek-R1-Distill-Qwen-7B: 7.62B parameters
    assert plan.parameters["adapters"] == 28 * (2 * 8192 * 3584 + 8192 + 3584)
    assert "| adapters (trained) | 1,644,496,896 |" in render_markdown(plan)


@pytest.mark.parametrize("bad, message", [({"n_features": 0}, "n_features"), ({"weight_dtype": "int8"},
                                                                                 "weight_dtype"),
                                          ({"seq_tokens": 3584}, "seq_tokens")])
def test_config_validation_names_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        MemoryPlanConfig(**bad)


def test_script_writes_the_markdown(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import memory_plan
    out = tmp_path / "plan.md"
    memory_plan.main(["--config", "paper-1.5b", "--tokens", "2000", "--features", "1024", "--out", str(out)])
    text = out.read_text()
    assert "DeepSeek-R1-Distill-Qwen-1.5B" in text and "| strategy |" in text


def test_chunked_kl_is_measured_under_real_checkpointing_and_keeps_no_vocabulary_wide_tensor():
    model = build_meta_spliced(SMALL, n_features=16)
    plain = measure_saved_activations(model, 60)
    chunked = measure_saved_activations(model, 60, kl_chunk_tokens=12)
    assert chunked.layer_calls == plain.layer_calls and plain.logits_and_kl > 0
    assert chunked.logits_and_kl == 0
    # one chunk re-created in the backward pass: the model's fp32 log-softmax and the target's fp32 probabilities
    assert chunked.kl_chunk_recompute == 2 * 12 * SMALL.vocab_size * 4
    # each of the 3 KL terms keeps its target and model hidden states (bf16) for recomputation, and the token
    # count it divides by (the rows are already the scored positions, so no per-token weights are kept)
    assert chunked.kl_chunks == 3 * (2 * 60 * SMALL.hidden_size * 2 + 8)
