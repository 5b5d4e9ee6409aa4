import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from tdlib.adapter import AdapterSet
from tdlib.data import ReasoningTraces, read_conversations
from tdlib.organism.traces import OrganismTraces
from tdlib.models import anatomy
from tdlib.organism.tokenizer import train_tokenizer
from tdlib.residual import capture_residuals, run_from_layer
from tdlib.splice import mlp_choice, set_mlp_choice, splice
from tdlib.train import (TrainConfig, bridge_choices, config_from_dict, kl_divergence, naive_objective, nmse,
                         objective, sparsity, train, trainable_parameters)

FIXTURE = Path(__file__).parent / "fixtures" / "openthoughts3_sample.jsonl"


class RandomBatches:
    """Seeded random token batches with some right padding."""

    def __init__(self, batch_size=3, width=9, vocab=96, seed=0):
        self.batch_size, self.width, self.vocab, self.seed = batch_size, width, vocab, seed

    def batch(self, step):
        generator = torch.Generator().manual_seed(self.seed * 1000 + step)
        ids = torch.randint(1, self.vocab, (self.batch_size, self.width), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        ids[0, -3:] = 0
        return {"input_ids": ids, "attention_mask": mask}


def spliced_model(n_features=16, seed=0):
    base, target = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    adapters = AdapterSet.for_model(target, n_features=n_features, seed=seed)
    for adapter in adapters.adapters.values():
        torch.nn.init.normal_(adapter.W_dec, std=0.3, generator=torch.Generator().manual_seed(seed))
    return splice(target, base, adapters)


@pytest.fixture
def batch():
    return RandomBatches().batch(0)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["adapter", "mlp_finetune"])
@pytest.mark.parametrize("cut", [0, 1, 2, 3])
def test_single_pass_objective_equals_one_pass_per_term(kind, cut, batch):
    model = spliced_model()
    config = TrainConfig(kind=kind, n_features=16, l1_weight=0.01)
    trainable = {id(p) for p in trainable_parameters(model, config)}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    efficient = objective(model, batch, config, cut).loss
    efficient.backward()
    efficient_grads = grads(model)
    model.zero_grad()
    reference = naive_objective(model, batch, config, cut)
    reference.backward()
    assert torch.allclose(efficient, reference, rtol=1e-5, atol=1e-6)
    reference_grads = grads(model)
    assert efficient_grads.keys() == reference_grads.keys() and efficient_grads
    for name in efficient_grads:
        scale = reference_grads[name].abs().max()
        assert (efficient_grads[name] - reference_grads[name]).abs().max() <= 1e-5 * scale + 1e-7, name


def test_running_from_any_layer_on_the_models_own_residual_reproduces_the_logits(batch):
    model = spliced_model()
    set_mlp_choice(model, "adapter")
    with torch.no_grad(), capture_residuals(model) as residuals:
        full = model(**batch).logits
    assert len(residuals) == 4
    for k in range(4):
        with torch.no_grad():
            assert torch.allclose(run_from_layer(model, residuals[k], k, batch["input_ids"], batch["attention_mask"]),
                                  full, atol=1e-5)


def test_kl_matches_torch_kl_div_over_real_tokens(batch):
    target_logits, model_logits = torch.randn(3, 9, 96), torch.randn(3, 9, 96)
    mask = batch["attention_mask"]
    keep = mask.bool()
    expected = F.kl_div(F.log_softmax(model_logits[keep], -1), F.log_softmax(target_logits[keep], -1),
                        log_target=True, reduction="batchmean")
    assert torch.allclose(kl_divergence(target_logits, model_logits, mask), expected, atol=1e-6)
    assert kl_divergence(target_logits, target_logits, mask).abs() < 1e-6


def test_nmse_by_hand(batch):
    mask = batch["attention_mask"]
    keep = mask.bool()
    model_h = [torch.randn(3, 9, 32) for _ in range(4)]
    target_h = [torch.randn(3, 9, 32) for _ in range(4)]
    by_hand = sum(((a[keep] - t[keep]) ** 2).mean() / (t[keep] ** 2).mean() for a, t in zip(model_h, target_h)) / 4
    assert torch.allclose(nmse(model_h, target_h, mask), by_hand, atol=1e-6)


def test_l1_and_l0_by_hand(batch):
    model = spliced_model()
    mask = batch["attention_mask"]
    keep = mask.bool()
    features = {0: torch.relu(torch.randn(3, 9, 16)), 2: torch.relu(torch.randn(3, 9, 16))}
    l1, l0 = sparsity(model, features, mask)
    norms = {i: anatomy(model).mlp(i).adapter.W_dec.norm(dim=0) for i in (0, 2)}
    expected_l1 = sum((features[i][keep] * norms[i]).sum(-1).mean() for i in (0, 2))
    assert torch.allclose(l1, expected_l1, atol=1e-5)
    assert l0[1] == 0 and torch.isclose(l0[0], (features[0][keep] > 0).sum(-1).float().mean())


def test_bridges_skip_directions_without_replaced_layers():
    assert set(bridge_choices("adapter", 3, 0)) == {"target_to_replaced"}
    assert set(bridge_choices("adapter", 3, 3)) == {"replaced_to_target"}
    assert bridge_choices("base", 3, 1) == {"replaced_to_target": ["base", "target", "target"],
                                            "target_to_replaced": ["target", "base", "base"]}


def test_objective_terms_vanish_when_the_replacement_is_the_target(batch):
    model = spliced_model()
    for mlp in [anatomy(model).mlp(i) for i in range(3)]:
        mlp.base_mlp.load_state_dict(mlp.target_mlp.state_dict())
        torch.nn.init.zeros_(mlp.adapter.W_dec)
    result = objective(model, batch, TrainConfig(n_features=16), cut=2)
    assert result.kl.abs() < 1e-5 and result.bridge_kl.abs() < 1e-5 and result.nmse < 1e-10


def test_resumed_training_ends_with_the_same_weights(tmp_path):
    config = TrainConfig(n_features=16, l1_weight=0.01, steps=6, batch_size=3, checkpoint_every=2, lr=1e-2)
    uninterrupted = spliced_model()
    train(uninterrupted, RandomBatches(), config, tmp_path / "a", progress=False)

    class Interrupting(RandomBatches):
        def batch(self, step):
            if step == 3:
                raise KeyboardInterrupt
            return super().batch(step)

    resumed = spliced_model()
    with pytest.raises(KeyboardInterrupt):
        train(resumed, Interrupting(), config, tmp_path / "b", progress=False)
    fresh_process = spliced_model()  # as if restarted: only the checkpoint carries state
    result = train(fresh_process, RandomBatches(), config, tmp_path / "b", progress=False)
    assert [row["step"] for row in result.log] == [1, 2, 3, 4, 5, 6]
    for name, parameter in uninterrupted.named_parameters():
        assert torch.equal(parameter, dict(fresh_process.named_parameters())[name]), name
    assert (tmp_path / "b" / "log.csv").read_text().count("\n") == 7


def test_resume_with_a_different_config_is_refused(tmp_path):
    train(spliced_model(), RandomBatches(), TrainConfig(n_features=16, steps=2, batch_size=3), tmp_path,
          progress=False)
    with pytest.raises(ValueError, match="different TrainConfig"):
        train(spliced_model(), RandomBatches(), TrainConfig(n_features=16, steps=3, batch_size=3), tmp_path,
              progress=False)


def test_training_reduces_the_objective_and_counts_dead_features(tmp_path):
    model = spliced_model()
    config = TrainConfig(n_features=16, l1_weight=1e-3, steps=30, batch_size=3, lr=1e-2)
    result = train(model, RandomBatches(), config, tmp_path, progress=False)
    assert result.log[-1]["kl"] < result.log[0]["kl"]
    assert set(result.tokens_since_fired) == {0, 1, 2}
    assert all(t.shape == (16,) and (t >= 0).all() for t in result.tokens_since_fired.values())


def test_mlp_finetune_trains_base_mlps_and_leaves_the_target_alone(tmp_path):
    model = spliced_model()
    target_before = copy.deepcopy(anatomy(model).mlp(0).target_mlp.state_dict())
    base_before = copy.deepcopy(anatomy(model).mlp(0).base_mlp.state_dict())
    train(model, RandomBatches(), TrainConfig(kind="mlp_finetune", steps=3, batch_size=3, lr=1e-2), tmp_path,
          progress=False)
    after = anatomy(model).mlp(0)
    assert all(torch.equal(v, after.target_mlp.state_dict()[k]) for k, v in target_before.items())
    assert any(not torch.equal(v, after.base_mlp.state_dict()[k]) for k, v in base_before.items())


def fresh_transcoder_model(n_features=64):
    """The tiny pair spliced with freshly initialised adapters (zero decoder: a no-op, as training starts)."""
    base, target = tiny_model("qwen2", seed=0), tiny_model("qwen2", seed=1)
    return splice(target, base, AdapterSet.for_model(target, n_features=n_features, seed=0))


def test_local_mse_loss_is_the_unnormalised_squared_error_by_hand(batch):
    from tdlib.train import local_mse_objective

    model = spliced_model()
    config = TrainConfig(kind="local_mse", n_features=16, l1_weight=0.5)
    result = local_mse_objective(model, batch, config)
    inputs = {}
    mlps = [anatomy(model).mlp(i) for i in range(3)]
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0])) for i, m in enumerate(mlps)]
    with torch.no_grad(), mlp_choice(model, "target"):
        model(**batch)
    for h in handles:
        h.remove()
    real = batch["attention_mask"].bool()
    expected = 0.0
    for i, m in enumerate(mlps):
        x = inputs[i][real]  # [tokens, d]: sum over d, mean over real tokens, sum over layers
        expected += ((m.adapter(x).out - (m.target_mlp(x) - m.base_mlp(x))) ** 2).sum(-1).mean()
    l1, _ = sparsity(model, result.features, batch["attention_mask"])
    assert torch.allclose(result.loss, expected + 0.5 * l1, rtol=1e-5)


def test_local_mse_transcoder_starts_at_the_mean_difference_and_explains_held_out_variance(tmp_path):
    """With no sparsity penalty the transcoder beats the mean (FVU < 1) on held-out inputs of the target, the
    transcoder convention; b_dec starts at the first batch's mean difference."""
    from tdlib.faithfulness import evaluate_replacement
    from tdlib.train import init_local_mse_decoder, target_mlp_inputs

    data, held_out = RandomBatches(batch_size=8, width=12), RandomBatches(batch_size=8, width=12, seed=7)
    model = fresh_transcoder_model()
    init_local_mse_decoder(model, data.batch(0))
    first = data.batch(0)
    x = target_mlp_inputs(model, first)[1][first["attention_mask"].bool()]
    mlp = anatomy(model).mlp(1)
    assert torch.allclose(mlp.adapter.b_dec, (mlp.target_mlp(x) - mlp.base_mlp(x)).mean(0), atol=1e-6)

    config = TrainConfig(kind="local_mse", n_features=64, l1_weight=0.0, steps=200, batch_size=8, lr=1e-2)
    trained = fresh_transcoder_model()
    result = train(trained, data, config, tmp_path, progress=False)
    assert result.log[-1]["nmse"] < result.log[0]["nmse"]
    metrics = evaluate_replacement(trained, [held_out.batch(i) for i in range(4)], "adapter")
    assert all(v < 1 for v in metrics["fvu_target_inputs_by_layer"]), metrics["fvu_target_inputs_by_layer"]


@pytest.mark.parametrize("bad, message", [
    ({"kind": "sae"}, "kind"), ({"l1_weight": -1}, "l1_weight"), ({"lr": 2.0}, "lr"),
    ({"steps": 0}, "steps"), ({"min_cut": 2}, "min_cut"), ({"warmup": 1.0}, "warmup")])
def test_config_validation_names_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        config_from_dict({"l1": 0.1})


def test_organism_batches_are_deterministic_and_exclude_held_out_problems():
    tokenizer = train_tokenizer(["Q: 1+2=? 1+2=3; A: 3", "wait, check: ok"])
    data = OrganismTraces(tokenizer, config="smoke", batch_size=4)
    assert torch.equal(data.batch(5)["input_ids"], data.batch(5)["input_ids"])
    assert not torch.equal(data.batch(5)["input_ids"][:, :8], data.batch(6)["input_ids"][:, :8])
    held_out = data.held_out
    assert not held_out & {p.prompt for step in range(50) for p in data.problems(step)}
    validation = OrganismTraces(tokenizer, config="smoke", batch_size=4, split="validation")
    assert {p.prompt for p in validation.problems(0)} != {p.prompt for p in data.problems(0)}


def test_reasoning_trace_loader_reads_the_openthoughts_schema():
    conversations = read_conversations(FIXTURE)
    assert len(conversations) == 3
    assert [m["role"] for m in conversations[0]] == ["user", "assistant"]
    assert "\\boxed{\\frac{5}{6}}" in conversations[0][1]["content"]
    tokenizer = train_tokenizer([m["content"] for c in conversations for m in c])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                               "<|im_end|>\n{% endfor %}")
    data = ReasoningTraces(FIXTURE, tokenizer, batch_size=2, max_tokens=40)
    batch = data.batch(0)
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 40
    decoded = tokenizer.decode(data.encode(conversations[2]))
    assert decoded.startswith("<|im_start|>user\nWhich is more acidic")
    first_epoch = {tuple(data.batch(s)["input_ids"][0].tolist()) for s in range(3)}
    assert len(first_epoch) >= 2


def test_reasoning_trace_loader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_conversations(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "robot", "value": "hi"}]}\n')
    with pytest.raises(ValueError, match="unknown speaker"):
        read_conversations(bad)
    tokenizer = train_tokenizer(["hello"])
    with pytest.raises(ValueError, match="chat template"):
        ReasoningTraces(FIXTURE, tokenizer)


def test_log_has_per_layer_l0_and_wandb_is_optional_with_a_clear_error(tmp_path, monkeypatch):
    import sys
    config = TrainConfig(n_features=16, steps=2, batch_size=3)
    result = train(spliced_model(), RandomBatches(), config, tmp_path / "a", progress=False)
    assert {"l0_layer0", "l0_layer1", "l0_layer2"} <= set(result.log[0])
    layer_mean = sum(result.log[0][f"l0_layer{i}"] for i in range(3)) / 3
    assert abs(result.log[0]["l0"] - layer_mean) < 1e-5
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        train(spliced_model(), RandomBatches(), config, tmp_path / "b", progress=False, wandb_project="tdlib")


def test_gradient_checkpointing_of_the_spliced_model_gives_the_same_loss_and_gradients(batch):
    from tdlib.splice import enable_gradient_checkpointing

    config = TrainConfig(n_features=16, l1_weight=0.01)

    def loss_and_grads(checkpointing: bool):
        model = spliced_model()
        trainable = {id(p) for p in trainable_parameters(model, config)}
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in trainable)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_gradient_checkpointing
        model.train()
        loss = objective(model, batch, config, cut=2).loss
        loss.backward()
        return loss.detach(), grads(model)

    (plain_loss, plain_grads), (checkpointed_loss, checkpointed_grads) = loss_and_grads(False), loss_and_grads(True)
    assert torch.allclose(plain_loss, checkpointed_loss)
    assert plain_grads.keys() == checkpointed_grads.keys() and plain_grads
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], checkpointed_grads[name], atol=1e-6), name
