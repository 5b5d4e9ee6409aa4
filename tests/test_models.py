import pytest
import torch

from conftest import FAMILIES, tiny_model
from tdlib.models import (IncompatiblePairError, check_compatible, find_layers, get_mlp, load_model,
                          load_pair, mlp_envoy, mlp_path)
from tdlib.organism import build_pair


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layers_and_mlps_are_found_for_each_family(family):
    model = tiny_model(family)
    assert len(find_layers(model)) == 3
    assert mlp_path(model, 2) == "model.layers.2.mlp"
    mlp = get_mlp(model, 1)
    assert mlp is model.model.layers[1].mlp
    assert mlp(torch.zeros(1, 2, 32)).shape == (1, 2, 32)


def test_gpt2_style_blocks_are_found():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32))
    assert mlp_path(model, 1) == "transformer.h.1.mlp"


def test_compatible_pair_passes(tiny_pair):
    check_compatible(*tiny_pair)


@pytest.mark.parametrize("override, property_name", [
    ({"num_hidden_layers": 2}, "number of layers"),
    ({"hidden_size": 48}, "hidden size"),
    ({"intermediate_size": 80}, "layer 0 MLP parameter shapes"),
    ({"vocab_size": 97}, "vocabulary size"),
])
def test_mismatched_pair_names_the_property(override, property_name):
    with pytest.raises(IncompatiblePairError, match=property_name):
        check_compatible(tiny_model("qwen2"), tiny_model("qwen2", **override))


def test_mismatched_architecture_is_named():
    with pytest.raises(IncompatiblePairError, match="architecture.*Qwen2ForCausalLM.*LlamaForCausalLM"):
        check_compatible(tiny_model("qwen2"), tiny_model("llama"))


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    return build_pair("smoke", cache_dir=tmp_path_factory.mktemp("organism"))


def test_pair_loads_from_folders_as_nnsight_models(organism):
    pair = load_pair(str(organism.base), str(organism.target))
    assert type(pair.target).__name__ == "LanguageModel"
    text = "Q: 3+4-5=? 3+4=7; wait, check: 7-4=3, ok; A: 2"
    assert pair.tokenizer.decode(pair.tokenizer(text)["input_ids"]) == text


def test_nnsight_mlp_inputs_and_outputs_equal_forward_hook_captures(organism):
    model = load_model(str(organism.target))
    inner = model._module
    n_layers = len(find_layers(inner))
    prompt = "Q: 3+4-5+1=?"
    captured = {}
    hooks = [get_mlp(inner, i).register_forward_hook(
        lambda module, args, output, i=i: captured.__setitem__(i, (args[0].clone(), output.clone())))
        for i in range(n_layers)]
    try:
        with torch.no_grad():
            inner(**model.tokenizer(prompt, return_tensors="pt"))
    finally:
        for hook in hooks:
            hook.remove()
    traced = []
    with torch.no_grad(), model.trace(prompt):
        for i in range(n_layers):  # nnsight 0.8: touch modules in execution order
            traced.append((mlp_envoy(model, i).input.save(), mlp_envoy(model, i).output.save()))
    for i in range(n_layers):
        assert torch.equal(traced[i][0], captured[i][0])
        assert torch.equal(traced[i][1], captured[i][1])


def test_remote_needs_a_hub_id(organism):
    with pytest.raises(ValueError, match="hub id"):
        load_model(str(organism.target), remote=True)


def test_unknown_dtype_is_refused(organism):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(organism.target), dtype="float8")
