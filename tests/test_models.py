import pytest
import torch

from conftest import FAMILIES, tiny_model
from tdlib.models import IncompatiblePairError, anatomy, check_compatible, load_model, mlp_envoy
from tdlib.organism import build_pair


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layers_and_mlps_are_found_for_each_family(family):
    model = tiny_model(family)
    assert anatomy(model).n_layers == 3
    assert anatomy(model).mlp_path(2) == "model.layers.2.mlp"
    mlp = anatomy(model).mlp(1)
    assert mlp is model.model.layers[1].mlp
    assert mlp(torch.zeros(1, 2, 32)).shape == (1, 2, 32)


def test_gpt2_style_blocks_are_found():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=32))
    assert anatomy(model).mlp_path(1) == "transformer.h.1.mlp"


def test_the_anatomy_is_resolved_once_cached_and_follows_swapped_parts():
    import copy

    from tdlib.models import Anatomy

    model = tiny_model("llama")
    parts = anatomy(model)
    assert anatomy(model) is parts and anatomy(parts) is parts  # cached; an Anatomy passes through
    assert (parts.layers_path, parts.mlp_name, parts.attention_name) == ("model.layers", "mlp", "self_attn")
    assert parts.post_mlp_norm_name is None and parts.final_norm is model.model.norm
    assert parts.head is model.lm_head and parts.attention(2) is model.model.layers[2].self_attn
    assert sorted(parts.block_norms(0)) == ["input_layernorm", "post_attention_layernorm"]
    assert list(parts.outer_norms()) == ["model.norm"]
    replacement = torch.nn.Identity()
    parts.set_mlp(1, replacement)  # read through the name: a swapped MLP is seen at once
    assert parts.mlp(1) is replacement and model.model.layers[1].mlp is replacement
    twin = copy.deepcopy(model)
    assert isinstance(anatomy(twin), Anatomy) and anatomy(twin).model is twin and anatomy(twin) is not parts


def test_gemma3_blocks_have_four_norms_and_a_post_mlp_norm():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    model = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8))
    parts = anatomy(model)
    assert parts.post_mlp_norm_name == "post_feedforward_layernorm"
    assert parts.post_mlp_norm(1) is model.model.layers[1].post_feedforward_layernorm
    assert sorted(parts.block_norms(0)) == ["input_layernorm", "post_attention_layernorm",
                                            "post_feedforward_layernorm", "pre_feedforward_layernorm"]


def test_an_unsupported_model_is_refused_by_name_when_its_anatomy_is_resolved():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="cannot find the decoder layers of NoBlocks.*LAYER_PATHS"):
        anatomy(NoBlocks())

    class NoMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.model.layers[0].dense = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="cannot find the MLP of Module \\(NoMLP\\).*MLP_NAMES"):
        anatomy(NoMLP())


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


def test_pair_loads_from_folders_as_compatible_nnsight_models(organism):
    base, target = load_model(str(organism.base)), load_model(str(organism.target))
    assert type(target).__name__ == "LanguageModel"
    check_compatible(base, target, base.tokenizer, target.tokenizer)
    text = "Q: 3+4-5=? 3+4=7; wait, check: 7-4=3, ok; A: 2"
    assert target.tokenizer.decode(target.tokenizer(text)["input_ids"]) == text


def test_nnsight_mlp_inputs_and_outputs_equal_forward_hook_captures(organism):
    model = load_model(str(organism.target))
    inner = model._module
    n_layers = anatomy(inner).n_layers
    prompt = "Q: 3+4-5+1=?"
    captured = {}
    hooks = [anatomy(inner).mlp(i).register_forward_hook(
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
