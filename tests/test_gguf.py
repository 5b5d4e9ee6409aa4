"""The GGUF conversion command on a tiny model (what transformers returns for a GGUF file is a model whose config
names the GGUF quantizer; the conversion's work is dropping it and proving the folder reproduces the logits)."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tdlib import gguf
from tdlib.organism.tokenizer import train_tokenizer


def gguf_like_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF-loaded model's config has it
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([gguf.CHECK_TEXT, "Q: 1+2=? A: 3"], vocab_size=96)


def test_a_converted_folder_is_plain_and_reproduces_the_logits(tmp_path, tokenizer):
    model = gguf_like_model(tokenizer)
    report = gguf.convert_model(model, tokenizer, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config and report["max_logit_gap"] <= 1e-6
    assert [p.name for p in tmp_path.iterdir()] == ["plain"]  # no staging folder left behind


def test_a_conversion_that_changes_the_logits_writes_nothing(tmp_path, tokenizer, monkeypatch):
    model = gguf_like_model(tokenizer)
    real_copy = gguf.plain_copy

    def broken_copy(source):
        copy = real_copy(source)
        with torch.no_grad():
            copy.model.layers[0].mlp.down_proj.weight.mul_(2)
        return copy

    monkeypatch.setattr(gguf, "plain_copy", broken_copy)
    with pytest.raises(RuntimeError, match="logits differ"):
        gguf.convert_model(model, tokenizer, tmp_path / "plain")
    assert list(tmp_path.iterdir()) == []


def test_the_command_names_a_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="no GGUF file"):
        gguf.main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")])
