"""Equivalence tests: the splice reproduces the target, the hybrid and base + adapter exactly."""
import copy

import pytest
import torch

from conftest import tiny_model
from tdlib.adapter import AdapterSet
from tdlib.models import anatomy, load_model
from tdlib.organism.tokenizer import train_tokenizer
from tdlib.splice import (attach_adapters, build_hybrid_copy, get_mlp_choice, mlp_choice,
                          set_mlp_choice, splice)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture
def spliced(tiny_pair):
    base, target = tiny_pair
    reference_target = copy.deepcopy(target)
    adapters = AdapterSet.for_model(target, n_features=24)
    model = splice(target, base, adapters)
    return model, base, reference_target, adapters


def test_all_target_choice_equals_the_target(spliced, tokens):
    model, _, reference_target, _ = spliced
    assert get_mlp_choice(model) == ["target"] * 3
    assert torch.equal(logits(model, tokens), logits(reference_target, tokens))


def test_all_base_choice_equals_a_hybrid_built_by_copying_weights(spliced, tokens):
    model, base, reference_target, _ = spliced
    hybrid = build_hybrid_copy(reference_target, base)
    set_mlp_choice(model, "base")
    assert torch.allclose(logits(model, tokens), logits(hybrid, tokens), atol=1e-6)
    assert not torch.allclose(logits(model, tokens), logits(reference_target, tokens), atol=1e-3)


def test_zero_initialised_adapters_change_nothing(spliced, tokens):
    model, *_ = spliced
    set_mlp_choice(model, "base")
    hybrid_logits = logits(model, tokens)
    set_mlp_choice(model, "adapter")
    assert torch.equal(logits(model, tokens), hybrid_logits)


def test_adapter_choice_adds_the_adapter_output_to_the_base_mlp(spliced):
    model, base, _, adapters = spliced
    torch.nn.init.normal_(adapters[1].W_dec, std=0.5)
    set_mlp_choice(model, "adapter")
    x = torch.randn(2, 5, 32)
    expected = anatomy(base).mlp(1)(x) + adapters[1].decode(adapters[1].encode(x))
    assert torch.allclose(anatomy(model).mlp(1)(x), expected, atol=1e-6)


def test_mlp_choice_context_restores_even_after_an_error(spliced):
    model, *_ = spliced
    set_mlp_choice(model, {0: "base"})
    with pytest.raises(RuntimeError):
        with mlp_choice(model, "adapter"):
            assert get_mlp_choice(model) == ["adapter"] * 3
            raise RuntimeError
    assert get_mlp_choice(model) == ["base", "target", "target"]


def test_bad_choices_are_refused_with_the_reason(spliced, tiny_pair):
    model, *_ = spliced
    with pytest.raises(ValueError, match="unknown MLP choice"):
        set_mlp_choice(model, "adpater")
    with pytest.raises(ValueError, match="3 layers"):
        set_mlp_choice(model, ["base"] * 2)
    with pytest.raises(ValueError, match="already spliced"):
        splice(model, tiny_pair[0])
    with pytest.raises(ValueError, match="not spliced"):
        set_mlp_choice(tiny_model("qwen2"), "base")


def test_adapter_choice_needs_an_adapter(tiny_pair):
    base, target = tiny_pair
    model = splice(target, base, AdapterSet.for_model(target, n_features=4, layers=[0]))
    with pytest.raises(ValueError, match="layer 1 has no adapter"):
        set_mlp_choice(model, "adapter")
    set_mlp_choice(model, {0: "adapter"})


def test_adapters_of_the_wrong_width_are_refused(spliced):
    model, *_ = spliced
    with pytest.raises(ValueError, match="hidden size"):
        attach_adapters(model, AdapterSet.for_model(tiny_model("qwen2", hidden_size=48), n_features=4))


def test_features_are_readable_and_editable_inside_nnsight(spliced, tokens):
    model, base, _, adapters = spliced
    for adapter in adapters.adapters.values():
        torch.nn.init.normal_(adapter.W_dec, std=0.5)
    set_mlp_choice(model, "adapter")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        load_model(model)
    traced = load_model(model, tokenizer=train_tokenizer(["Q: 1+2=? A: 3"]))
    with torch.no_grad(), traced.trace(tokens):
        mlp_input = traced.model.layers[0].mlp.input.save()
        base_out = traced.model.layers[0].mlp.base_mlp.output.save()
        acts = traced.model.layers[0].mlp.adapter.features.output.save()
    assert torch.allclose(acts, adapters[0].encode(mlp_input), atol=1e-6)
    with torch.no_grad(), traced.trace(tokens):
        base_out = traced.model.layers[0].mlp.base_mlp.output.save()
        traced.model.layers[0].mlp.adapter.features.output[:] = 0
        ablated = traced.model.layers[0].mlp.output.save()
    assert torch.allclose(ablated, base_out + adapters[0].b_dec, atol=1e-6)


def test_generate_on_the_spliced_target_matches_the_plain_target(spliced, tokens):
    model, _, reference_target, _ = spliced
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(tokens, **kwargs), reference_target.generate(tokens, **kwargs))
